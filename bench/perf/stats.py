"""The figures reported: medians over the rounds, rounded."""

from __future__ import annotations

import statistics

from .common import BenchError


def median(values) -> float:
    vals = [v for v in values if v is not None]
    if not vals:
        raise BenchError("no value to take the median of")
    return statistics.median(vals)


def rnd(v: float, digits: int = 3) -> float:
    return round(float(v), digits)
