"""How noisy a difference between two ranks is: seeds paired, validation blocks paired.

Two sources of noise decide whether a step on the rank curve is real:

- **Training noise** (seed to seed). Seed *i* has the same data order and the same
  initialisation seed at every rank, so the seeds are *paired*: a seed that draws a bad data
  order is bad at every rank, and a difference between two ranks within a seed is far less
  noisy than the spread of either rank. The losses are modelled as additive,
  ``loss[r, s] = mu[r] + beta[s] + e[r, s]``, fitted by least squares over the trials that
  completed; ``sigma`` is the standard deviation of ``e``. The adjusted mean of a rank,
  ``mu[r] + mean(beta)``, is its mean over seeds with the seed effects taken out, so ranks
  with different seeds (racing adds seeds to some ranks only) are compared fairly. With a
  single seed per rank the seed effects and ``e`` cannot be told apart: then the spread of a
  rank with two or more seeds (``unpaired``) stands in, an upper bound on ``sigma``.
- **Validation sampling** (block to block). Both ranks are scored on the same validation
  blocks, so their per-block losses are paired too; the standard error of the mean per-block
  difference is known from one evaluation, with no extra training.

The standard error of a difference adds both: ``se^2 = 2 sigma^2 / n + se_val^2`` over the
``n`` seeds the two ranks share. Its degrees of freedom are Welch-Satterthwaite's for that
sum (:func:`rankwise.core.stats.welch_df`), and a test counts a difference as real beyond
Student's t at those degrees of freedom (:meth:`Noise.test`), not beyond a fixed 2: one
degree of freedom means 12.7 standard errors. Three estimates of the seed noise can stand
behind a difference, chosen before looking at their sizes:

1. the additive model's residual over every paired trial of the run (``paired``), or
2. the pair's own paired differences, when the two ranks share two or more seeds
   (``pair``): of these two, the one with more degrees of freedom (ties: the first);
3. only when neither exists, the pooled spread of single ranks (``unpaired``), an upper
   bound (it holds the seed effects that pairing removes).

Example (seed 1 is worse at every rank by 0.1; the ranks differ by 0.02 within a seed):
    >>> losses = {(1, 0): 3.00, (1, 1): 3.10, (2, 0): 2.98, (2, 1): 3.08, (4, 0): 2.97,
    ...           (4, 1): 3.07}
    >>> n = Noise.fit(losses)
    >>> n.source, round(n.sigma, 6), round(n.mean(1) - n.mean(2), 4)
    ('paired', 0.0, 0.02)
    >>> n.se(1, 2) is not None and n.se(1, 2) < 1e-6  # pairing removes the 0.1 seed effect
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from rankwise.core.stats import t_critical, welch_df

__all__ = ["Noise"]

# Back-fitting the additive model converges geometrically on these small tables (a few
# ranks x a few seeds); 200 sweeps are far past 1e-12 on every table seen.
_SWEEPS = 200


@dataclass(frozen=True)
class Noise:
    """The noise model of one rank curve (see the module docstring)."""

    sigma: float | None
    """Per-trial training noise of a paired difference (None: no rank has two seeds)."""
    df: int
    """Degrees of freedom behind ``sigma``."""
    source: str
    """``paired`` (the additive model's residual), ``unpaired`` (the spread of single ranks,
    an upper bound) or ``none``."""
    means: dict[int, float] = field(default_factory=dict)
    """Each rank's mean over seeds, adjusted for the seed effects."""
    seeds: dict[int, tuple[int, ...]] = field(default_factory=dict)
    blocks: dict[int, tuple[float, ...]] = field(default_factory=dict)
    """Each rank's per-block validation losses (averaged over its seeds), when recorded."""
    unpaired: tuple[float, int] | None = None
    """The pooled spread of the ranks with two or more seeds and its df (an upper bound)."""
    losses: dict = field(default_factory=dict, compare=False, repr=False)
    """Every ``(rank, seed)`` loss, for a pair's own paired differences."""

    @classmethod
    def fit(
        cls,
        losses: Mapping[tuple[int, int], float],
        blocks: Mapping[tuple[int, int], Sequence[float]] | None = None,
    ) -> Noise:
        """The model of ``losses[(rank, seed)]`` (and per-block losses, when known)."""
        ranks = sorted({r for r, _ in losses})
        seeds = {r: tuple(sorted(s for q, s in losses if q == r)) for r in ranks}
        if len(seeds) == len(losses) or not _connected(losses):
            # One seed per rank (nothing to pair), or ranks that share no seed, e.g. r=1 with
            # only seed 0 and r=2 with only seed 1: the seed effects cannot be taken out.
            raw = {r: sum(losses[(r, s)] for s in seeds[r]) / len(seeds[r]) for r in ranks}
            sigma, df, source = _within_rank(losses, seeds)
            spread = (sigma, df) if sigma is not None else None
            mean_blocks = _mean_blocks(blocks or {}, seeds)
            return cls(sigma, df, source, raw, seeds, mean_blocks, spread, dict(losses))
        mu, beta = _additive(losses)
        used = len(ranks) + len({s for _, s in losses}) - 1
        df = len(losses) - used
        means = {r: mu[r] + sum(beta.values()) / len(beta) for r in ranks}
        u_sigma, u_df, _ = _within_rank(losses, seeds)
        spread = (u_sigma, u_df) if u_sigma is not None else None
        # One residual degree of freedom is a single 2x2 interaction: thin, and the t
        # critical value at 1 df (12.7) says so; the test picks the estimate with more df.
        if df >= 1:
            rss = sum((y - mu[r] - beta[s]) ** 2 for (r, s), y in losses.items())
            sigma, source = math.sqrt(rss / df), "paired"
        else:
            sigma, df, source = _within_rank(losses, seeds)
        mean_blocks = _mean_blocks(blocks or {}, seeds)
        return cls(sigma, df, source, means, seeds, mean_blocks, spread, dict(losses))

    def mean(self, rank: int) -> float:
        return self.means[rank]

    def se(self, a: int, b: int, n_a: int = 1, n_b: int = 1) -> float | None:
        """Standard error of ``mean(a) - mean(b)``; ``n_*`` count the seeds of a rank the model
        does not hold (a hypothetical rank). None when neither source of noise is known."""
        return self.test(a, b, n_a, n_b)[0]

    def test(self, a, b, n_a: int = 1, n_b: int = 1) -> tuple[float | None, float, str]:
        """``(se, df, source)`` of ``mean(a) - mean(b)``: the seed-noise estimate with the
        most degrees of freedom (module docstring) plus the validation blocks' noise, with
        Welch-Satterthwaite's df for the sum (``inf`` when only the blocks are known)."""
        if a == b:  # a rank against itself: the same trials, no noise
            return 0.0, math.inf, "same"
        val = self.val_se(a, b)
        parts = [] if val is None else [(val**2, self._val_df(a, b))]
        train = self._train_var(a, b, n_a, n_b)
        if train is not None:
            parts.append(train[:2])
        if not parts:
            return None, math.inf, "none"
        se = math.sqrt(sum(v for v, _ in parts))
        return se, welch_df(parts), train[2] if train else "blocks"

    def seed_df(self, a, b, n_a: int = 1, n_b: int = 1) -> int | None:
        """Degrees of freedom of the seed-noise estimate behind ``a - b`` (None: none)."""
        train = None if a == b else self._train_var(a, b, n_a, n_b)
        return None if train is None else int(train[1])

    def _train_var(self, a, b, n_a: int, n_b: int) -> tuple[float, int, str] | None:
        """The seed noise's variance of the difference, its df and which estimate it is."""
        seeds_a, seeds_b = self.seeds.get(a, ()), self.seeds.get(b, ())
        shared = sorted(set(seeds_a) & set(seeds_b))
        options = []  # (variance, df, source), in the order ties are broken
        if shared and self.source == "paired" and self.sigma is not None:
            options.append((2 * self.sigma**2 / len(shared), self.df, "paired"))
        if len(shared) >= 2 and self.losses:
            d = [self.losses[(a, s)] - self.losses[(b, s)] for s in shared]
            m = sum(d) / len(d)
            var = sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)
            options.append((var, len(d) - 1, "pair"))
        if self.unpaired is not None and not options:
            sigma, df = self.unpaired
            n_a, n_b = len(seeds_a) or n_a, len(seeds_b) or n_b
            options.append((sigma**2 * (1 / n_a + 1 / n_b), df, "unpaired"))
        if not options:
            return None
        most = max(df for _, df, _ in options)
        return next(o for o in options if o[1] == most)

    def _val_df(self, a, b) -> int:
        return max(1, len(self.blocks.get(a, ())) - 1)

    def val_se(self, a: int, b: int) -> float | None:
        """Standard error of the mean per-block difference (validation sampling only)."""
        x, y = self.blocks.get(a), self.blocks.get(b)
        if not x or not y or len(x) != len(y) or len(x) < 2:
            return None
        d = [p - q for p, q in zip(x, y, strict=True)]
        m = sum(d) / len(d)
        return math.sqrt(sum((v - m) ** 2 for v in d) / (len(d) - 1) / len(d))

    def to_dict(self) -> dict:
        """What recommendation.json and the report say of the noise."""
        return {
            "sigma": self.sigma,
            "df": self.df,
            "source": self.source,
            "seeds": {str(r): list(s) for r, s in self.seeds.items()},
        }

    def describe(self) -> str:
        if self.sigma is None:
            return "seed-to-seed noise not measured (one seed per rank)"
        how = "paired by seed" if self.source == "paired" else "spread of one rank, unpaired"
        return (
            f"seed-to-seed noise {self.sigma:.4f} nats per trial ({how}, {self.df} df: "
            f"a difference counts beyond {t_critical(self.df):.3g} SE)"
        )


def _additive(losses: Mapping[tuple[int, int], float]):
    """Least-squares rank and seed effects of an additive model (back-fitting)."""
    ranks = {r for r, _ in losses}
    seed_ids = {s for _, s in losses}
    by_rank = {r: [(s, y) for (q, s), y in losses.items() if q == r] for r in ranks}
    by_seed = {s: [(r, y) for (r, t), y in losses.items() if t == s] for s in seed_ids}
    mu = dict.fromkeys(ranks, 0.0)
    beta = dict.fromkeys(seed_ids, 0.0)
    for _ in range(_SWEEPS):
        before = dict(mu)
        for r, cells in by_rank.items():
            mu[r] = sum(y - beta[s] for s, y in cells) / len(cells)
        for s, cells in by_seed.items():
            beta[s] = sum(y - mu[r] for r, y in cells) / len(cells)
        if all(abs(mu[r] - before[r]) < 1e-13 for r in ranks):
            break
    return mu, beta


def _connected(losses) -> bool:
    """Whether every rank is linked to every other through shared seeds (else the seed
    effects cannot be separated from the rank effects)."""
    cells = list(losses)
    if not cells:
        return True
    seen_r, seen_s, todo = {cells[0][0]}, set(), [cells[0][0]]
    while todo:
        r = todo.pop()
        for q, s in cells:
            if q == r and s not in seen_s:
                seen_s.add(s)
                for q2, s2 in cells:
                    if s2 == s and q2 not in seen_r:
                        seen_r.add(q2)
                        todo.append(q2)
    return seen_r == {r for r, _ in cells}


def _within_rank(losses, seeds) -> tuple[float | None, int, str]:
    """The pooled spread of the ranks that have two or more seeds (unpaired)."""
    ss, df = 0.0, 0
    for r, ss_r in seeds.items():
        if len(ss_r) < 2:
            continue
        ys = [losses[(r, s)] for s in ss_r]
        m = sum(ys) / len(ys)
        ss += sum((y - m) ** 2 for y in ys)
        df += len(ys) - 1
    if df == 0:
        return None, 0, "none"
    return math.sqrt(ss / df), df, "unpaired"


def _mean_blocks(blocks, seeds) -> dict[int, tuple[float, ...]]:
    """Per rank, the per-block losses averaged over its seeds (only complete, equal sets)."""
    out = {}
    for r, ss in seeds.items():
        rows = [blocks.get((r, s)) for s in ss]
        if not rows or any(not row for row in rows) or len({len(row) for row in rows}) != 1:
            continue
        out[r] = tuple(sum(col) / len(col) for col in zip(*rows, strict=True))
    return out
