"""How sure a score is: 95% bootstrap intervals over samples, and paired differences on shared samples.

A task's score is the mean of its samples' scores. Its interval is the percentile bootstrap:
draw the task's n samples with replacement `RESAMPLES` times, take the mean of each draw, and
keep the middle 95% of those means. An average over tasks (a category, Avg, the papers'
Avg.) resamples within each task and averages the tasks' draws, so every task keeps its
weight in the average (a stratified bootstrap). A paired difference resamples the per-sample
differences between two runs on the samples both have: the same prompt answered by both
methods, so the prompts' own difficulty cancels out and small differences become visible.

Draws are made with numpy's Generator from the seed and the draw's name (a task, a metric)
and the number of samples, never from the order of the work, so the same seed gives the
same intervals whatever else a report holds. Every run of a task with the same number of
samples shares one set of draws, so their means come from a single matrix product.
"""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np

#: the seed of every draw unless --seed says otherwise
DEFAULT_SEED = 0
#: bootstrap draws per interval: the bounds' own Monte Carlo error is then about 0.06 standard errors
RESAMPLES = 2000
#: the share of the draws' means an interval holds
LEVEL = 0.95


@lru_cache(maxsize=256)
def _resample_weights(name: str, size: int, seed: int) -> np.ndarray:
    """(RESAMPLES, size): how often each sample is drawn in each resample, divided by ``size``."""
    generator = np.random.default_rng([seed, zlib.crc32(f"{name}\0{size}".encode("utf-8"))])
    weights = generator.multinomial(size, np.full(size, 1 / size), size=RESAMPLES) / size
    weights.setflags(write=False)
    return weights


def resampled_means(scores: np.ndarray, name: str, seed: int = DEFAULT_SEED) -> np.ndarray | None:
    """The means of ``scores`` (samples on the last axis; earlier axes are runs scored on the same samples)
    under each bootstrap resample: shape (..., RESAMPLES). None for fewer than two samples, which say
    nothing about their spread."""
    scores = np.asarray(scores, dtype=float)
    if scores.shape[-1] < 2:
        return None
    return scores @ _resample_weights(name, scores.shape[-1], seed).T


def paired_difference_draws(scores: np.ndarray, reference: np.ndarray, name: str,
                            seed: int = DEFAULT_SEED) -> np.ndarray | None:
    """`resampled_means` of ``scores - reference``, two runs' scores of the same samples in the same order."""
    return resampled_means(np.asarray(scores, dtype=float) - np.asarray(reference, dtype=float), name, seed)


def average_draws(parts: list[np.ndarray]) -> np.ndarray:
    """The draws of an average: the parts' draws averaged resample by resample (each part resampled alone)."""
    return np.mean(np.stack(parts), axis=0)


def bounds(draws: np.ndarray) -> tuple[float, float]:
    """The interval's (low, high): the draws' percentiles around the middle `LEVEL` of them."""
    tail = 100 * (1 - LEVEL) / 2
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)
