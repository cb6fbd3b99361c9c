"""File helpers: atomic writes, directory replacement, work folders and their leftovers, hashes.

A folder is built beside its final path under a name that carries the builder's process id
(`NAME.partial-PID`, `NAME.old-PID`), then moved into place. A process killed midway leaves that
folder behind; the next run at the same path removes the ones whose process is gone, and nothing
else.
"""

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

WORK_TAGS = ("partial", "old", "creating")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
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


def work_path(target: Path, tag: str) -> Path:
    """Where this process builds (`partial`, `creating`) or sets aside (`old`) `target`."""
    assert tag in WORK_TAGS
    return Path(target).with_name(f"{Path(target).name}.{tag}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process; no PID is that large
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_leftovers(target: Path) -> list[Path]:
    """Remove the work folders of `target` left by processes that are gone; returns them."""
    target = Path(target)
    pattern = re.compile(rf"{re.escape(target.name)}\.({'|'.join(WORK_TAGS)})-(\d+)")
    removed = []
    if not target.parent.is_dir():
        return removed
    for path in target.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not path.is_symlink():
            pid = int(match.group(2))
            if pid == os.getpid() or not _alive(pid):
                shutil.rmtree(path, ignore_errors=True)  # another run may be removing it too
                removed.append(path)
    return removed


def replace_directory(new: Path, target: Path) -> None:
    """Move the finished directory `new` to `target`, replacing what was there."""
    if target.exists():
        old = work_path(target, "old")
        target.rename(old)
        new.rename(target)
        shutil.rmtree(old)
    else:
        new.rename(target)


@contextmanager
def parent_folders(path: Path) -> Iterator[None]:
    """Create the missing folders above `path`; if the body fails, remove those it leaves empty,
    so that a refused command leaves no trace."""
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
