"""Files written whole or not at all: the one way edgeq writes a file that a reader (another process, the next
run, a user after Ctrl-C) may open.

The data goes to a uniquely named temporary file beside the destination (so concurrent writers never share
one), is flushed to disk, gets ordinary permissions (mkstemp's 0600 would hide a shared database from other
users) and is renamed over the destination; on any exception, KeyboardInterrupt included, the temporary file is
removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temporary path to write (by any library: np.savez, savefig, tarfile) that replaces ``path`` on exit."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> None:
    """``path`` holds exactly ``data`` (str: UTF-8), or what it held before."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
