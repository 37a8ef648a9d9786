"""Results written whole or not at all: a kill mid-write leaves the old file (or none), never a
partial one that a rerun, `latentqa read` or `latest_decoder()` would take as complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_whole(path: Path, text: str) -> None:
    """`path` holding `text`: written beside it, flushed to disk, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    partial = Path(name)
    try:
        with open(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        partial.chmod(0o666 & ~_umask())  # as open() would make it (mkstemp's is owner-only)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _sync_folder(path.parent)


def publish_folder(source: Path, target: Path) -> None:
    """`source` copied to `target` (which must not exist): copied beside it, flushed, renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        shutil.copytree(source, partial, dirs_exist_ok=True)
        for file in (f for f in partial.rglob("*") if f.is_file()):
            with open(file, "rb") as copied:
                os.fsync(copied.fileno())
        if target.exists():  # rename would replace an empty folder
            raise FileExistsError(f"{target} exists: a published folder is never replaced")
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _sync_folder(target.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sync_folder(folder: Path) -> None:
    """The rename itself on disk (a folder's entries are flushed through the folder)."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)
