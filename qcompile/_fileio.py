"""Atomic file output: write to a temporary file in the destination folder, then rename.

A failure at any point leaves no partial file behind, and an existing file at the
destination is replaced only once the new content is complete.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

__all__ = ["atomic_write", "atomic_path"]


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; on success it is renamed to `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str, data, mode: str = "wb") -> None:
    """Write `data` (bytes or str per `mode`) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            f.write(data)
