"""A progress bar: tqdm on a terminal when it is installed, else one self-overwriting
stderr line; into a log file (stderr not a terminal), a single line at the end.

    with progress(total=200, desc="calibrate", unit="sample") as bar:
        bar.update(16)
"""
from __future__ import annotations

import sys
import time
from typing import Optional

__all__ = ["progress"]


class _Null:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Line(_Null):
    """`desc: 48/200 sample (24%) 1.2 s`, redrawn at most ten times a second."""

    def __init__(self, total: Optional[int], desc: str, unit: str, redraw: bool = True):
        self.total, self.desc, self.unit, self.redraw = total, desc, unit, redraw
        self.n = 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.redraw and now - self.last >= 0.1:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        pct = f" ({100 * self.n // self.total}%)" if self.total else ""
        sys.stderr.write(f"{chr(13) if self.redraw else ''}{self.desc}: {self.n}{of} {self.unit}{pct} {now - self.start:.1f} s")
        sys.stderr.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        sys.stderr.write("\n")
        sys.stderr.flush()


def progress(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True):
    """A context manager with `update(n)`: tqdm if importable, else a plain stderr line;
    does nothing when `enabled` is false."""
    if not enabled:
        return _Null()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Line(total, desc, unit)
    if not sys.stderr.isatty():  # a log file: one line at the end, not a redraw every batch
        return _Line(total, desc, unit, redraw=False)
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
