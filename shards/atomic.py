"""One way to write a local file so that a reader sees the old bytes or the new, never a part.

Every local file the project writes for someone else to read (lock, config, checkpoints, metrics,
synthetic NWB files) goes through ``atomic_path``: the bytes go to a temp name beside the target (the
same filesystem, so the final step is a rename, atomic on POSIX), are fsynced when asked, and replace
the target only if the block finished; a failure leaves the target as it was and removes the temp.
A process killed mid-write leaves only a ``*.tmp`` beside it, never a torn target.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True, tag: str | None = None) -> Iterator[str]:
    """Yield a temp path beside ``path`` to write; on a clean exit it replaces ``path``.

    ``tag`` names the temp file (default: a random id), so that two writers never share one."""
    path = os.fspath(path)
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.{tag or uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes | str, fsync: bool = True) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` through ``atomic_path``."""
    raw = data.encode() if isinstance(data, str) else data
    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as fh:
        fh.write(raw)
