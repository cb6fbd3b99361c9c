"""Where a store lives: a local folder, or a URL in object storage (`s3://bucket/prefix/depth.zarr`).

Stores take their paths as `UPath`s (universal_pathlib over fsspec). A local path is a
`pathlib.Path`, so local stores behave exactly as plain paths do; a URL is reached through its
fsspec file system (s3fs for `s3://`), configured the way its library is: for S3, the standard AWS
environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_PROFILE`, ...)
or fsspec's own configuration. Nothing here is kdmtl-specific.

An object store has no folders and no atomic rename: `pipeline.files` moves a finished store into
place by copying it. Readers never trust a store caught halfway, since every store records the
size of each of its files and is checked against that record when it is opened.
"""

import os
from pathlib import Path

import fsspec
from upath import UPath

from pipeline.errors import KdmtlError

# s3fs keeps directory listings it has read and serves `exists` from them: a store written since
# by another process (a resumed extraction, a worker) would look absent. kdmtl lists rarely, so
# it lists afresh; a setting of the user's own in fsspec's configuration wins.
fsspec.config.conf.setdefault("s3", {}).setdefault("use_listings_cache", False)

EXTRAS = {"s3": "kdmtl[s3]", "s3a": "kdmtl[s3]"}


def store_path(where: str | os.PathLike) -> UPath:
    """`where` as a store path: a local path as given, or a URL through its fsspec file system,
    which is reached once here, so that a missing bucket or an unreachable store is named now
    rather than taken for a missing store (fsspec answers "no" to `exists` on any error)."""
    try:
        path = UPath(where)
        fs = path.fs
    except ImportError as error:
        extra = EXTRAS.get(str(where).split("://")[0], "its fsspec file system")
        raise KdmtlError(f"{where}: reading this kind of URL needs {extra} ({error})") from None
    except ValueError as error:
        raise KdmtlError(f"{where} is not a path kdmtl can open: {error}") from None
    if path.protocol in ("file", "local"):  # a local path written as a URL
        return UPath(path.path)
    if is_local(path):
        return path
    if "//" in str(where).split("://", 1)[-1].rstrip("/"):
        # Object storage keeps "a//b" as a key of its own, which no listing of "a/b" finds.
        raise KdmtlError(f"{where} has an empty part (//): remove the extra slash")
    bucket = path.path.strip("/").split("/")[0]
    try:
        try:
            fs.info(path.path)
        except FileNotFoundError:  # no store there yet; its bucket must exist
            fs.info(bucket)
    except FileNotFoundError:
        raise KdmtlError(
            f"{where}: there is no bucket {bucket!r} at this endpoint: create it, or check the "
            "URL and AWS_ENDPOINT_URL"
        ) from None
    except PermissionError as error:
        raise KdmtlError(f"{where}: access denied ({error}); check the credentials") from None
    except remote_errors() as error:
        raise unreachable(error) from None
    return path


def is_local(path: UPath | Path) -> bool:
    return isinstance(path, Path)


def files_below(folder: UPath) -> list[str]:
    """The relative (POSIX) path of every file below `folder`: in object storage from one
    listing (walking it as folders costs a request per entry)."""
    if is_local(folder):
        return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    root = folder.path.rstrip("/")
    return sorted(name[len(root) + 1 :] for name in folder.fs.find(root))


def zarr_location(path: UPath | Path) -> str:
    """What zarr opens for `path`: an absolute local path, so that the same array opened in
    another process (a dask worker, a DataLoader worker) finds it wherever that one runs, or the
    URL, for zarr to open through fsspec."""
    return str(path.absolute()) if is_local(path) else str(path)


def unreachable(error: BaseException) -> KdmtlError:
    return KdmtlError(
        f"cannot reach the object store: {error}; check its endpoint and credentials "
        "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, for S3) "
        "or fsspec's configuration"
    )


def remote_errors() -> tuple[type[BaseException], ...]:
    """What an object store's client raises when it cannot be reached at all (no credentials, no
    endpoint), rather than the OSError it gives for a missing or refused object."""
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return ()
    return (BotoCoreError,)
