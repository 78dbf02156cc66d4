"""Files written whole or not at all, and JSON read with errors that name the file.

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
from typing import Any, Iterator, Type


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


def read_json(path: str, caller: str, error: Type[Exception] = ValueError) -> Any:
    """The JSON document in ``path``. A missing file is FileNotFoundError, one that is not
    UTF-8 JSON (or nests too deeply to parse) is ``error``; both messages start with
    ``caller`` and name the file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{caller}: {path}: no such file") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{caller}: {path} is not valid JSON ({e})") from None
