"""Progress of a long loop on stderr: done/total, images per second and ETA, readable in SLURM logs too."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

BAR_WIDTH = 30
T = TypeVar("T")


class Progress:
    """`label: done/total unit, images/s, eta`: a redrawn bar on a terminal, and otherwise one line per
    tenth of the work (a redrawn bar would be one endless line in SLURM and CI logs)."""

    def __init__(self, total: int, unit: str, label: str = "", enabled: bool = True):
        self.total, self.unit, self.label, self.enabled = total, unit, label, enabled
        self.done = self.images = 0
        self.start = time.perf_counter()
        self.elapsed = 0.0  # until the last update, so the closing rate excludes any wrap-up
        self.tty = sys.stderr.isatty()

    def rate(self) -> float:
        return self.images / max(self.elapsed, 1e-9)

    def update(self, images: int, done: int = 1) -> None:
        """`done` more units finished, holding `images` images."""
        before = self.done
        self.done += done
        self.images += images
        self.elapsed = time.perf_counter() - self.start
        if not self.enabled:
            return
        total = max(self.total, 1)
        eta = self.elapsed / self.done * max(self.total - self.done, 0)
        text = (f"{self.label + ': ' if self.label else ''}{self.done}/{self.total} {self.unit}  "
                f"{self.rate():7.1f} images/s  eta {eta / 60:.1f} min")
        if self.tty:
            filled = BAR_WIDTH * min(self.done, total) // total
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            print(f"\r[{bar}] {text}", end="\n" if self.done >= self.total else "", file=sys.stderr, flush=True)
        elif self.done >= self.total or 10 * self.done // total != 10 * before // total:
            print(text, file=sys.stderr, flush=True)


def track(items: Iterable[T], progress: Progress, images: Callable[[T], int]) -> Iterator[T]:
    """Yield `items`, counting each as one unit of `progress` holding images(item) images."""
    for item in items:
        yield item
        progress.update(images(item))
