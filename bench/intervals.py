"""Confidence intervals for the benches' figures, by resampling (the bootstrap)."""

from __future__ import annotations

import random
from typing import Callable, Sequence, Tuple


def bootstrap_interval(values: Sequence[float], statistic: Callable[[Sequence[float]], float],
                       confidence: float = 0.95, resamples: int = 10_000) -> Tuple[float, float]:
    """A `confidence` interval for `statistic` of `values`, by resampling them
    (the bootstrap's percentile interval): where the statistic of a far longer
    run on this machine, as loaded as it was, would likely fall. Seeded, so
    the same values always give the same interval."""
    rng = random.Random(0)
    estimates = sorted(statistic(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = int(resamples * (1 - confidence) / 2)
    return estimates[tail], estimates[-1 - tail]
