"""Errors caused by user input. The command line shows their message, without a traceback."""

import errno
import pickle
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class KdmtlError(Exception):
    """A problem the user can fix: bad data, a missing or stale input. The message says how."""


class DataError(KdmtlError):
    """A dataset folder or prepared store that cannot be used as it is."""


# What zarr, numcodecs, json, numpy.load and torch.load raise on a damaged or foreign file.
DAMAGE = (
    OSError,
    ValueError,  # json and unicode decoding, zarr's checksums and metadata, numpy headers
    RuntimeError,  # numcodecs' decompressors, torch's zip reader
    KeyError,
    TypeError,
    EOFError,
    zipfile.BadZipFile,
    pickle.UnpicklingError,
)


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


@contextmanager
def reading(path: Path | str, remedy: str) -> Iterator[None]:
    """The one place where a library's error on a user's file becomes a DataError naming the file
    and the remedy. A full disk is left alone: the command reports it as such."""
    try:
        yield
    except KdmtlError:
        raise
    except DAMAGE as error:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise
        raise DataError(f"cannot read {path}: {first_line(error)}; {remedy}") from None
