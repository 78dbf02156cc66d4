"""Files written whole or not at all.

A file is written under a temporary name in its own directory, flushed to disk, renamed over
the target (an atomic step on POSIX file systems), and the directory is flushed so the rename
itself survives a crash. A reader, or a process that is killed half way, sees the old file or
the new one, never a part of either.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


def fsync_dir(path: str) -> None:
    """Flushes a directory's entries (renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path`` for the caller to write (with any library);
    on leaving the block the file is flushed and renamed to ``path``. If the block raises,
    the temporary file is removed and ``path`` is left as it was.

    The temporary name ends with the target's name, so writers that pick a format from the
    extension (matplotlib) see the right one.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON in ``path``, atomically (NaN and infinities are refused)."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
