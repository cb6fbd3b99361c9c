"""File helpers: atomic writes, directory replacement, work folders and their leftovers, hashes.

A folder is built beside its final path under a name that carries the builder's process id
(`NAME.partial-PID`, `NAME.old-PID`), then moved into place. A process killed midway leaves that
folder behind; the next run at the same path removes the ones whose process is gone, and nothing
else. In object storage, where processes of several machines meet, the name carries the host as
well (`NAME.partial-HOST-PID`), and a run removes only its own host's leftovers.

Folders of stores may be local or in object storage (`pipeline.store.location`), which has no
rename: there, a "move" copies every object and deletes the originals. A store's root `zarr.json`,
whose manifest says kdmtl made it, is copied first and deleted last, so a store interrupted
midway is still known as kdmtl's to replace; readers refuse it, since its files are not those
its manifest records.
"""

import hashlib
import os
import re
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from upath import UPath

from pipeline.store.location import is_local

WORK_TAGS = ("partial", "old", "creating")
ROOT_METADATA = "zarr.json"


def sha256_file(path: Path | UPath) -> str:
    digest = hashlib.sha256()
    with UPath(path).open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(temporary_path)`, then move the file into place: readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def work_path(target: Path | UPath, tag: str) -> Path | UPath:
    """Where this process builds (`partial`, `creating`) or sets aside (`old`) `target`."""
    assert tag in WORK_TAGS
    target = UPath(target)
    owner = str(os.getpid()) if is_local(target) else f"{socket.gethostname()}-{os.getpid()}"
    return target.with_name(f"{target.name}.{tag}-{owner}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; no PID is that large
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftovers(target: Path | UPath) -> list[Path | UPath]:
    """Remove the work folders of `target` left by processes that are gone; returns them."""
    target = UPath(target)
    owner = r"(\d+)" if is_local(target) else rf"{re.escape(socket.gethostname())}-(\d+)"
    pattern = re.compile(rf"{re.escape(target.name)}\.({'|'.join(WORK_TAGS)})-{owner}")
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink():
            pid = int(match.group(2))
            if pid == os.getpid() or not _alive(pid):
                remove_tree(path)
                removed.append(path)
    return removed


def _unless_gone(_function, _path, info) -> None:
    if not issubclass(info[0], FileNotFoundError):
        raise info[1]


def remove_tree(path: Path | UPath) -> None:
    """Delete the folder `path` and what it holds, if it is there (another run may be removing
    it too). In object storage, a store's root metadata goes last."""
    path = UPath(path)
    if is_local(path):
        shutil.rmtree(path, onerror=_unless_gone)
        return
    fs, root = path.fs, f"{path.path}/{ROOT_METADATA}"
    files = [name for name in fs.find(path.path) if name != root]
    if files:
        fs.rm(files)
    with suppress(FileNotFoundError):
        fs.rm_file(root)


def _copy_tree(source: UPath, target: UPath) -> None:
    """Copy every object under `source` to the same place under `target`, the root metadata
    first (object storage has no rename)."""
    fs, root = source.fs, f"{source.path}/{ROOT_METADATA}"
    files = [name for name in fs.find(source.path) if name != root]
    if fs.exists(root):
        fs.copy(root, f"{target.path}/{ROOT_METADATA}")
    if files:
        fs.copy(files, [target.path + name[len(source.path) :] for name in files])


def move_into_place(new: Path | UPath, target: Path | UPath) -> bool:
    """Move the finished folder `new` to `target` unless something is there already, in which
    case `new` is removed; returns whether it moved. Safe when processes race to make the same
    folder: locally the rename fails for all but the first; in object storage, a later copy of
    the same content may land over the first, never after a removal."""
    new, target = UPath(new), UPath(target)
    if is_local(new):
        try:
            new.rename(target)
            return True
        except OSError:
            remove_tree(new)
            return False
    if target.exists():
        remove_tree(new)
        return False
    _copy_tree(new, target)
    remove_tree(new)
    return True


def replace_directory(new: Path | UPath, target: Path | UPath) -> None:
    """Move the finished directory `new` to `target`, replacing what was there."""
    new, target = UPath(new), UPath(target)
    if not is_local(new):
        remove_tree(target)
        _copy_tree(new, target)
        remove_tree(new)
    elif target.exists():
        old = work_path(target, "old")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


@contextmanager
def parent_folders(path: Path) -> Iterator[None]:
    """Create the missing folders above `path`; if the body fails, remove those it leaves empty,
    so that a refused command leaves no trace. Object storage has no folders to make."""
    if not is_local(UPath(path)):
        yield
        return
    missing = [p for p in reversed(Path(path).absolute().parents) if not p.exists()]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for folder in reversed(missing):
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone: not ours to remove
                break
        raise
