"""Repeated timings reported as median and spread, after warm-up."""
from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median
from typing import Callable


@dataclass(frozen=True)
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the repeats disagree."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s,
                "repeats": self.repeats, "spread": self.spread}


def measure(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed with a monotonic clock."""
    return measure_interleaved([fn], repeats=repeats, warmup=warmup)[0]


def measure_interleaved(fns: list[Callable[[], object]], repeats: int = 5, warmup: int = 1) -> list[Timing]:
    """Time several functions in turn, one call of each per round, so that a change of machine load
    during the run falls on all of them alike (their ratios are the figures that matter)."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for fn, samples in zip(fns, times):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return [Timing(median(t), min(t), max(t), len(t)) for t in times]
