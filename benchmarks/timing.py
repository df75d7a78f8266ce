"""Timing helpers shared by the benchmark scripts: these machines are noisy, so compare in alternation."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(
    first: Callable, second: Callable, repeats: int, warmup: int = 3, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, float]:
    """Median seconds of two callables timed in alternation, after ``warmup`` untimed calls of each.

    ``clock`` is wall-clock time by default; ``time.thread_time`` measures the calling thread's CPU time instead,
    blind to the time it waits while other processes hold the cores."""
    for _ in range(warmup):
        first(), second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, bucket in ((first, times[0]), (second, times[1])):
            start = clock()
            fn()
            bucket.append(clock() - start)
    return statistics.median(times[0]), statistics.median(times[1])
