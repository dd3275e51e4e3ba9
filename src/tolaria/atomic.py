"""Crash-safe file replacement: the one way Tolaria rewrites a whole file.

Write a temporary file beside the target, fsync it, ``os.replace`` it over the target and
fsync the directory: a crash at any point leaves the old file or the new one, never a torn
one.  Append-only logs (``*.jsonl``) are not rewritten this way; they append one complete
line per write and readers ignore a torn last line.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: str | bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` all at once.  ``durable=False`` skips the fsyncs, for
    files rewritten every few seconds whose loss in a power cut costs nothing (a heartbeat):
    the replacement is still atomic."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as file:
            file.write(payload)
            if durable:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; nothing more we can do
    finally:
        os.close(fd)


def read_whole(path: Path, error: type[Exception]) -> bytes:
    """``path``'s bytes; a missing or unreadable file is one ``error`` naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: missing") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
