"""Row orders computed on the fly: a keyed permutation of [0, n) and the mixture's per-step source counts.

Neither holds anything per row, so a loader's memory does not grow with the corpus (a materialized
`numpy.random.permutation(n)` costs 8 bytes per row in every process: 146M rows = 1.2 GB).

`Permutation(n, key)` is a bijection of [0, n): a balanced Feistel network on 2h bits (2^2h >= n, the smallest
such h, so the domain is < 4n) with a splitmix64 round function, restricted to [0, n) by cycle walking
(x -> F(x) until it lands below n; fewer than 4 evaluations on average, and a bijection on [0, n) because F is
one on the larger domain). Six rounds: four already make a Feistel network a pseudo-random permutation
(Luby-Rackoff); the two extra cost nothing next to reading the rows. numpy has no keyed permutation with random
access (Generator.permutation materializes), hence this small one.

`MixtureCounts` splits the row stream of a mixture into sources: after j global steps of G rows, sources
0..s together have given floor(j * G * c_s) rows, c_s the cumulative normalized weight (exact integer arithmetic,
c_last = 1). Source s's count is the difference of two such floors: non-decreasing in j, within 1 row of
j * G * w_s, and computable for any j without the history, so resuming is a seek.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
ROUNDS = 6


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (uint64 -> uint64, wrapping multiplication)."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def round_keys(*key: int) -> np.ndarray:
    """ROUNDS uint64 round keys from integers (seed, epoch, ...), through numpy's SeedSequence hashing."""
    return np.random.SeedSequence([int(k) for k in key]).generate_state(ROUNDS, np.uint64)


class Permutation:
    """perm(i) for i in [0, n): a keyed pseudo-random bijection of [0, n), evaluated per element (vectorized)."""

    def __init__(self, n: int, keys: np.ndarray):
        if n < 1:
            raise ValueError(f"permutation of {n} elements")
        self.n = int(n)
        self.half = max(1, -(-max(1, (self.n - 1).bit_length()) // 2))  # bits per Feistel half
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = np.asarray(keys, np.uint64)

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        with np.errstate(over="ignore"):
            for k in self.keys:
                left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, i: np.ndarray) -> np.ndarray:
        i = np.asarray(i, np.int64)
        if i.size and (i.min() < 0 or i.max() >= self.n):
            raise IndexError(f"permutation index outside [0, {self.n})")
        y = self._feistel(i.astype(np.uint64))
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():  # cycle walking
            y[out_of_range] = self._feistel(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64)


def epoch_permutation(n: int, seed: int, epoch: int, stream: int = 0) -> Permutation:
    """The permutation of epoch `epoch` (stream: a per-source tag for mixtures; 0 for a single dataset)."""
    return Permutation(n, round_keys(seed, epoch, stream))


class MixtureCounts:
    """Rows each source has given after j global steps of `step_rows` rows (see the module docstring)."""

    SCALE = 1 << 48  # weights are rounded to multiples of 2^-48 of the total

    def __init__(self, weights: Sequence[float], step_rows: int):
        w = [Fraction(x).limit_denominator(1 << 20) for x in weights]
        if any(x <= 0 for x in w):
            raise ValueError(f"mixture weights must be > 0, got {list(weights)}")
        total = sum(w)
        acc, self.cum = Fraction(0), []
        for x in w:
            acc += x / total
            self.cum.append(int(acc * self.SCALE))
        self.cum[-1] = self.SCALE
        self.G = int(step_rows)

    def before(self, step: int) -> list[int]:
        """Rows of each source in global steps [0, step)."""
        rows = step * self.G
        cum = [0] + [rows * c // self.SCALE for c in self.cum]
        return [b - a for a, b in zip(cum, cum[1:])]
