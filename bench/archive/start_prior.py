"""Start where the answer probably is: does a start-rank prior save the ladder trials?

Issue "Search cost, second attempt", lever 2. The ladder starts at a rank set by the base
model's size alone (``SearchConfig.start_rank_for``: 4 under 1B parameters, 8 under 10B, 16
above, snapped to ``--ranks``) and climbs, or probes down, from there. A prior that knew
where the answer lies before training could start there and save trials. Candidates, each
computed from what a run knows before its first trial:

- ``size-only``: today's rule (every base here is under 1B parameters: 4, snapped).
- ``tinker/trial``: Tinker's "LoRA Without Regret" guidance, LoRA works when its trainable
  parameters are at least the supervised tokens: the smallest listed rank whose adapter has
  at least the tokens *one trial trains on* (max_steps x batch x seq_len), the largest rank
  when none has (:func:`start_rank_prior`, c = 1).
- ``tinker/data``: the same with the training set's tokens (one epoch, after the split).
- ``axolotl``: axolotl PR #3691, by training records: < 1k -> 8, < 10k -> 16, < 100k -> 32,
  else 64, snapped to the listed ranks like the size-only rule.
- ``fit: constant``: one fitted constant, the start rank 2^median(log2 answer) of the other
  tasks (leave one task out), snapped: a prior that reads no feature.
- ``fit: fewest trials``: one fitted constant, the start (1, 2, 4, .., 128, snapped to each
  task's ranks) whose replays trained the fewest trials summed over the other tasks.
- ``fit: c x trial tokens`` / ``fit: c x data tokens``: Tinker's rule with a fitted constant,
  the smallest listed rank whose parameters reach c x tokens, c = 2^median(log2(answer x
  params per rank / tokens)) over the other tasks (leave one task out: a task never sees its
  own answer).
- ``oracle``: start at the grid's answer; ``hindsight``: of the listed starts that give
  the size-only start's answers (every outer seed), the one with the fewest mean trials,
  found by replaying every start. Neither is a prior (both need the grid): they bound what
  a prior could save.

Tasks (each setting is a task; "answer" = the grid's answer under the default criterion,
knee 1% of the improvement over the base model):

1. **pools** (5): the stability pools ``bench/.cache/stability/<task>.json`` (planted-k4,
   planted-k16, planted2-k8, far-off-k8, hot-head-k8; ranks 1..32 x 6 paired seeds). The
   answer is the grid over all 6 seeds. Each prior's start is replayed with the new
   default, ``Ladder(max_seeds=3, noise_seeds=2)`` (``bench.stability.new_default`` with
   another ``start_rank``), for outer seeds 1..5 exactly as ``bench.stability.replay``
   orders the pool's seeds.
2. **search-cost** (10): the one-seed grid curves of bench/RESULTS.md, "Search cost"
   (planted k = 2..32 at 300 x 16 x 128, planted2 k = 2, 8, 32 at 300 x 16 x 64, SmolLM2-135M
   on stdlib docstrings and package READMEs at 60 x 4 x 64); their run folders are gone,
   the curves are copied below (:data:`SEARCH_COST`).
3. **criterion** (5): the one-seed curves of bench/RESULTS.md, "Criterion" (planted k =
   2..32, 700 x 16 x 128, ranks 1..64; :data:`CRITERION_CURVES`).

On the one-seed curves the ladder is ``Ladder(max_seeds=1)`` told each asked rank's stored
loss, as a :class:`TrialResult` *without per-block val losses* (the tables kept only the
best val loss): no noise is known, so every comparison is a point estimate and nothing is
undecided. A trial's cost there is one trial's tokens, so the token ratio equals the
trials ratio.

LoRA trainable parameters per rank are counted from the module shapes (:class:`Shape`,
in + out of every targeted matrix, per layer); ``--check-params`` compares them with
``rankwise.analysis.params.lora_param_count`` (PEFT's own count) on the stored tiny models,
on configs built for the hidden-128 shapes, and on SmolLM2-135M's config (torch, seconds). Supervised tokens: every token of a
packed block is trained on here (plain text, EOS included), so one trial trains max_steps x
batch x seq_len; the planted sets have 2,048 training records of seq_chars + 1 tokens. The
SmolLM2 sets were tokenised with rankwise's own data pipeline and tokenizer
(``--measure-corpora``; it converts the embedded GGUF on first use): docstrings 1,800 training records, 114,302
tokens; the READMEs corpus has grown since that run (58 records, 70,702 characters then),
so its tokens are today's per-character rate times that run's characters (an estimate).

Usage::

    .venv/bin/python -m bench.archive.start_prior                      # the tables, no torch, ~4 s
    .venv/bin/python -m bench.archive.start_prior --check-params       # + PEFT's parameter counts
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.archive.start_prior --measure-corpora   # SmolLM2 tokens

(``.venv/bin/python bench/archive/start_prior.py`` works as well.)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # bench/ (this file is in bench/archive/)
if not __package__:  # run as a file (bench/archive/start_prior.py): make `bench` importable
    sys.path.insert(0, str(ROOT.parent))

from bench import stability  # noqa: E402
from rankwise.config import SearchConfig  # noqa: E402
from rankwise.core.criteria import Criterion, recommend  # noqa: E402
from rankwise.core.scores import rank_scores  # noqa: E402
from rankwise.core.strategies import Ladder  # noqa: E402
from rankwise.records import TrialResult  # noqa: E402

OUTER = stability.OUTER
CRITERION = Criterion("knee", 0.01, "base")  # the default when this was measured


# -- the prior ------------------------------------------------------------------------------
def start_rank_prior(
    params: Mapping[int, int], tokens: int, ranks: Sequence[int] | None = None, c: float = 1.0
) -> int:
    """The smallest rank whose adapter has at least ``c`` x ``tokens`` trainable parameters
    (Tinker's "LoRA Without Regret": LoRA works when its parameters are at least the
    supervised tokens), or the largest rank when none has.

    ``params``: trainable parameters per rank (``rankwise.analysis.params``); ``tokens``:
    supervised tokens; ``ranks``: the candidates (default: the keys of ``params``).

    >>> smollm2_qv = {r: 57_600 * r for r in (1, 2, 4, 8, 16, 32)}  # SmolLM2-135M, q/v
    >>> start_rank_prior(smollm2_qv, 15_360), start_rank_prior(smollm2_qv, 114_302)
    (1, 2)
    >>> tiny = {r: 1_280 * r for r in (1, 2, 4, 8, 16, 32)}  # planted task, hidden 64
    >>> start_rank_prior(tiny, 614_400), start_rank_prior(tiny, 614_400, c=1 / 60)
    (32, 8)
    """
    ranks = sorted(params if ranks is None else ranks)
    if not ranks:
        raise ValueError("start_rank_prior: no ranks")
    need = c * tokens
    return next((r for r in ranks if params[r] >= need), ranks[-1])


def snap(ranks: Sequence[int], target: float) -> int:
    """The listed rank nearest ``target`` in doublings (ties: the smaller), as
    ``SearchConfig.start_rank_for`` snaps its size rule."""
    return min(ranks, key=lambda r: (round(abs(math.log2(r / target)), 9), r))


def axolotl_rank(records: int) -> int:
    """axolotl PR #3691's rank by training-sample count."""
    return 8 if records < 1_000 else 16 if records < 10_000 else 32 if records < 100_000 else 64


# -- tasks ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A decoder's matrix shapes (Llama / Qwen3 layout), enough to count LoRA parameters."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    def matrices(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear module of one layer."""
        h, m = self.hidden, self.intermediate
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, m), "up_proj": (h, m), "down_proj": (m, h),
        }  # fmt: skip

    def lora_per_rank(self, targets: Sequence[str]) -> int:
        """Trainable parameters of a rank-1 LoRA adapter on ``targets`` (r x (in + out) each)."""
        mats = self.matrices()
        return self.layers * sum(sum(mats[t]) for t in targets)

    def n_params(self) -> int:
        """Base parameters, matrices and embeddings (norms and biases left out)."""
        body = self.layers * sum(i * o for i, o in self.matrices().values())
        return body + self.vocab * self.hidden * (1 if self.tied else 2)


PLANTED_64 = Shape(64, 128, 2, 4, 4, 16, 128)  # bench/planted.py, 4k <= 64 (testing.tiny_model)
PLANTED_128 = Shape(128, 256, 2, 4, 4, 32, 128)  # bench/planted.py, k = 32
PLANTED2_96 = Shape(96, 288, 3, 4, 2, 24, 128)  # bench/planted2.py, 4k <= 48
PLANTED2_128 = Shape(128, 384, 3, 4, 2, 32, 128)  # bench/planted2.py, k = 32
SMOLLM2 = Shape(576, 1536, 30, 9, 3, 64, 49152, tied=True)  # SmolLM2-135M
QVUD = ("q_proj", "v_proj", "up_proj", "down_proj")
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("q_proj", "v_proj")
R32 = (1, 2, 4, 8, 16, 32)
PLANTED_DATA = {"records": 2048, "dataset_tokens": 2048 * 128}  # 127 chars + EOS per record
PLANTED2_DATA = {"records": 2048, "dataset_tokens": 2048 * 64}  # 63 chars + EOS
# SmolLM2 sets, measured by --measure-corpora (rankwise's split: 10% val, max_examples 2000).
DOCSTRINGS = {"records": 1800, "dataset_tokens": 114_302}
# READMEs: today's corpus (68 records, 83,218 chars; 62 train records, 19,844 train tokens)
# scaled to that run's 58 records / 70,702 chars: 53 train records (10% val), ~16,860 tokens.
READMES = {"records": 53, "dataset_tokens": round(19_844 * 70_702 / 83_218)}


@dataclass(frozen=True)
class Setting:
    """A task at one training budget: what the run knows before training, and its curve."""

    name: str
    group: str  # "pool", "search-cost" or "criterion"
    ranks: tuple[int, ...]
    shape: Shape
    targets: tuple[str, ...]
    steps: int
    batch: int
    seq_len: int
    records: int
    dataset_tokens: int
    base_loss: float = 0.0
    curve: tuple[float, ...] = ()  # one seed's best val loss per rank (one-seed groups)
    pool: str = ""  # stability pool name (pools)

    @property
    def label(self) -> str:
        return f"{self.name} @{self.steps}x{self.batch}x{self.seq_len}"

    @property
    def trial_tokens(self) -> int:
        return self.steps * self.batch * self.seq_len

    @property
    def per_rank(self) -> int:
        return self.shape.lora_per_rank(self.targets)

    def params(self) -> dict[int, int]:
        return {r: r * self.per_rank for r in self.ranks}


def _planted(name, group, shape, ranks, steps, batch, base, curve, two=False) -> Setting:
    data = PLANTED2_DATA if two else PLANTED_DATA
    return Setting(
        name, group, tuple(ranks), shape, ALL7 if two else QVUD, steps, batch,
        64 if two else 128, base_loss=base, curve=tuple(curve), **data,
    )  # fmt: skip


# bench/RESULTS.md, "Search cost": the grid curves (best val loss per listed rank, one seed).
SEARCH_COST = [
    _planted("planted-k2", "search-cost", PLANTED_64, R32, 300, 16, 4.3193,
             [3.7816, 3.7081, 3.6962, 3.6875, 3.6857, 3.6832]),
    _planted("planted-k4", "search-cost", PLANTED_64, R32, 300, 16, 4.3142,
             [3.8534, 3.7505, 3.6731, 3.6551, 3.6414, 3.6396]),
    _planted("planted-k8", "search-cost", PLANTED_64, R32, 300, 16, 4.4127,
             [3.8401, 3.7844, 3.7439, 3.7138, 3.7027, 3.7020]),
    _planted("planted-k16", "search-cost", PLANTED_64, (2, 4, 8, 16, 32, 64), 300, 16, 4.3781,
             [3.7856, 3.7395, 3.7164, 3.7034, 3.6996, 3.6980]),
    _planted("planted-k32", "search-cost", PLANTED_128, (4, 8, 16, 32, 64, 128), 300, 16, 4.1402,
             [2.8655, 2.8372, 2.8225, 2.8157, 2.8127, 2.8110]),
    _planted("planted2-k2", "search-cost", PLANTED2_96, R32, 300, 16, 4.5800,
             [3.9870, 3.9746, 3.9718, 3.9700, 3.9691, 3.9679], two=True),
    _planted("planted2-k8", "search-cost", PLANTED2_96, R32, 300, 16, 4.6217,
             [4.0821, 4.0591, 4.0459, 4.0424, 4.0398, 4.0381], two=True),
    _planted("planted2-k32", "search-cost", PLANTED2_128, (2, 4, 8, 16, 32, 64), 300, 16, 4.4838,
             [3.9335, 3.9176, 3.9070, 3.9036, 3.9023, 3.9011], two=True),
    Setting("smollm2-docstrings", "search-cost", R32, SMOLLM2, QV, 60, 4, 64, base_loss=3.9971,
            curve=(3.5105, 3.5042, 3.4991, 3.4951, 3.4991, 3.5006), **DOCSTRINGS),
    Setting("smollm2-readmes", "search-cost", R32, SMOLLM2, QV, 60, 4, 64, base_loss=4.2600,
            curve=(3.8977, 3.8996, 3.8888, 3.8841, 3.8824, 3.8838), **READMES),
]  # fmt: skip
# bench/RESULTS.md, "Criterion": planted k = 2..32 at 700 x 16 x 128, ranks 1..64, one seed.
R64 = (1, 2, 4, 8, 16, 32, 64)
CRITERION_CURVES = [
    _planted("planted-k2", "criterion", PLANTED_64, R64, 700, 16, 4.3193,
             [3.7131, 3.6589, 3.6538, 3.6503, 3.6492, 3.6508, 3.6504]),
    _planted("planted-k4", "criterion", PLANTED_64, R64, 700, 16, 4.3142,
             [3.7516, 3.6550, 3.5958, 3.5891, 3.5889, 3.5893, 3.5898]),
    _planted("planted-k8", "criterion", PLANTED_64, R64, 700, 16, 4.4127,
             [3.7707, 3.7038, 3.6624, 3.6368, 3.6337, 3.6331, 3.6341]),
    _planted("planted-k16", "criterion", PLANTED_64, R64, 700, 16, 4.3781,
             [3.7691, 3.7093, 3.6610, 3.6349, 3.6191, 3.6186, 3.6179]),
    _planted("planted-k32", "criterion", PLANTED_128, R64, 700, 16, 4.1402,
             [2.9054, 2.8283, 2.7874, 2.7680, 2.7503, 2.7472, 2.7461]),
]  # fmt: skip


# The stability pools' settings (bench/stability.py: TRAIN, PLANTED2_TRAIN).
def _pool(name: str, two: bool = False) -> Setting:
    if two:
        return Setting(name, "pool", R32, PLANTED2_96, ALL7, 350, 8, 64, pool=name, **PLANTED2_DATA)
    return Setting(name, "pool", R32, PLANTED_64, QVUD, 500, 8, 128, pool=name, **PLANTED_DATA)


POOLS = [
    _pool("planted-k4"), _pool("planted-k16"), _pool("planted2-k8", two=True),
    _pool("far-off-k8"), _pool("hot-head-k8"),
]  # fmt: skip
SETTINGS = POOLS + SEARCH_COST + CRITERION_CURVES


# -- replay ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Replay:
    """One ladder replayed from one start: its answer and the trials it asked for."""

    rank: int | None
    undecided: bool
    trials: int
    tokens: int


def curve_results(s: Setting) -> dict[int, TrialResult]:
    """The one-seed curve as trials (no per-block val losses: the tables kept none)."""
    return {
        r: TrialResult(key=f"r{r}", rank=r, seed=0, status="complete", best_val_loss=v,
                       train_tokens=s.trial_tokens)
        for r, v in zip(s.ranks, s.curve, strict=True)
    }  # fmt: skip


def replay_curve(
    ranks: Sequence[int], results: Mapping[int, TrialResult], base: float, start: int
) -> Replay:
    """``Ladder(max_seeds=1)`` from ``start``, each asked rank answered by its stored trial."""
    ladder = Ladder(ranks=list(ranks), start_rank=start, criterion=CRITERION, base_loss=base,
                    max_seeds=1)  # fmt: skip
    asked = []
    while (p := ladder.ask()) is not None:
        asked.append(results[p.rank])
        ladder.tell(asked[-1])
    rec = recommend(ladder.scores(), CRITERION, ladder.stop_reason, base)
    return Replay(rec.rank, bool(rec.undecided), len(asked), sum(t.train_tokens for t in asked))


def replay_pool(pool: dict, start: int, outer: int) -> Replay:
    """The new default (``Ladder(max_seeds=3, noise_seeds=2)``) from ``start`` on a stability
    pool, the pool's seeds in outer seed ``outer``'s order (as ``stability.replay``)."""
    trials, perm = stability.pool_results(pool), stability.permutation(outer, pool["seeds"])
    ladder = Ladder(ranks=sorted(pool["ranks"]), start_rank=start, criterion=CRITERION,
                    base_loss=pool["base_loss"], max_seeds=3, noise_seeds=2)  # fmt: skip
    asked = []
    while (p := ladder.ask()) is not None:
        stored = trials[(p.rank, perm[p.seed])]
        asked.append(stored.replace(seed=p.seed, key=f"r{p.rank}-s{p.seed}"))
        ladder.tell(asked[-1])
    rec = recommend(ladder.scores(), CRITERION, ladder.stop_reason, pool["base_loss"])
    return Replay(rec.rank, bool(rec.undecided), len(asked), sum(t.train_tokens for t in asked))


def grid_answer(s: Setting, pool: dict | None) -> int | None:
    """The grid's answer: every rank (pools: with all 6 seeds) under the default criterion."""
    if pool is not None:
        return stability.replay(pool, "grid, all N seeds", CRITERION, OUTER[0]).rank
    scores = rank_scores(list(curve_results(s).values()))
    return recommend(scores, CRITERION, "grid complete", s.base_loss).rank


# -- priors ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Known:
    """A setting a fitted prior may learn from: its answer and its replays' mean trials."""

    setting: Setting
    answer: int
    trials: Mapping[int, float] = field(default_factory=dict)
    """Mean trials of the replays from each listed start."""


Prior = Callable[[Setting, list[Known]], int]
"""A prior's start rank for a setting, given the other settings (only the fitted priors
read them)."""


def _median_log2(xs: list[float]) -> float:
    return 2 ** statistics.median(math.log2(x) for x in xs)


def size_only(s: Setting, _train) -> int:
    return SearchConfig(ranks=list(s.ranks)).start_rank_for(s.shape.n_params())


def tinker_trial(s: Setting, _train) -> int:
    return start_rank_prior(s.params(), s.trial_tokens)


def tinker_data(s: Setting, _train) -> int:
    return start_rank_prior(s.params(), s.dataset_tokens)


def axolotl(s: Setting, _train) -> int:
    return snap(s.ranks, axolotl_rank(s.records))


def fit_constant(s: Setting, train: list[Known]) -> int:
    return snap(s.ranks, _median_log2([k.answer for k in train]))


TARGETS = tuple(2**i for i in range(8))  # the constant starts fit_fewest tries: 1..128


def fewest_target(train: list[Known]) -> int:
    """The constant start (snapped to each setting's ranks) with the fewest trials summed
    over ``train`` (ties: the smaller)."""
    return min(TARGETS, key=lambda t: (sum(k.trials[snap(k.setting.ranks, t)] for k in train), t))


def fit_fewest(s: Setting, train: list[Known]) -> int:
    return snap(s.ranks, fewest_target(train))


def fit_c(tokens: Callable[[Setting], int]) -> Callable[[list], float]:
    """c = 2^median(log2(answer x params per rank / tokens)): the c at which Tinker's rule
    would start each training task exactly at its answer, their median in doublings."""
    return lambda train: _median_log2(
        [k.answer * k.setting.per_rank / tokens(k.setting) for k in train]
    )


def fitted_tinker(tokens: Callable[[Setting], int]) -> Prior:
    fit = fit_c(tokens)
    return lambda s, train: start_rank_prior(s.params(), tokens(s), c=fit(train))


def _trial(s: Setting) -> int:
    return s.trial_tokens


def _data(s: Setting) -> int:
    return s.dataset_tokens


PRIORS: dict[str, Prior] = {
    "size-only": size_only,
    "tinker/trial": tinker_trial,
    "tinker/data": tinker_data,
    "axolotl": axolotl,
    "fit: constant": fit_constant,
    "fit: fewest trials": fit_fewest,
    "fit: c x trial tokens": fitted_tinker(_trial),
    "fit: c x data tokens": fitted_tinker(_data),
}
BASELINE = "size-only"
ORACLE = "oracle"  # start at the grid's answer
HINDSIGHT = "hindsight"  # the start with the fewest trials, known only after the grid
NAMES = [*PRIORS, ORACLE, HINDSIGHT]


# -- the measurement ------------------------------------------------------------------------
def load_pools(folder: Path = stability.POOLS) -> dict[str, dict]:
    return {s.pool: stability.load_pool(folder / f"{s.pool}.json") for s in POOLS
            if (folder / f"{s.pool}.json").exists()}  # fmt: skip


def measure(settings: list[Setting], pools: Mapping[str, dict]) -> list[dict]:
    """Per setting: its answer, each prior's start (leave one setting out for the fitted
    ones), and the replays from every start."""
    settings = [s for s in settings if not s.pool or s.pool in pools]
    known, replayed = [], []
    for s in settings:
        by_start = {}  # every listed start, replayed
        for start in s.ranks:
            if s.pool:
                by_start[start] = [replay_pool(pools[s.pool], start, o) for o in OUTER]
            else:
                by_start[start] = [replay_curve(s.ranks, curve_results(s), s.base_loss, start)]
        trials = {r: _mean(x.trials for x in got) for r, got in by_start.items()}
        known.append(Known(s, grid_answer(s, pools.get(s.pool)), trials))
        replayed.append(by_start)
    rows = []
    for i, (s, by_start) in enumerate(zip(settings, replayed, strict=True)):
        answer = known[i].answer
        train = known[:i] + known[i + 1 :]  # leave this setting out
        starts = {name: prior(s, train) for name, prior in PRIORS.items()}
        starts[ORACLE] = answer
        # the fewest mean trials over the starts that give the size-only start's answers on
        # every outer seed (ties: nearest the answer, then smaller)
        same = [r for r in s.ranks if [x.rank for x in by_start[r]]
                == [x.rank for x in by_start[starts[BASELINE]]]]  # fmt: skip
        starts[HINDSIGHT] = min(same, key=lambda r: (
            _mean(x.trials for x in by_start[r]), abs(doublings(r, answer)), r))  # fmt: skip
        replays = {name: by_start[start] for name, start in starts.items()}
        rows.append({"setting": s, "answer": answer, "starts": starts, "replays": replays,
                     "by_start": by_start})  # fmt: skip
    return rows


def doublings(start: int, answer: int) -> float:
    return math.log2(start / answer)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summary(rows: list[dict], group: str | None = None) -> list[dict]:
    """Per prior, over the rows (of ``group``): starts vs the answer, trials and tokens
    against the size-only start, answers changed against the size-only start."""
    rows = [r for r in rows if group is None or (r["setting"].group == "pool") == (group == "pool")]
    out = []
    for name in NAMES:
        above = sum(r["starts"][name] > r["answer"] for r in rows)
        below = sum(r["starts"][name] < r["answer"] for r in rows)
        dist = [doublings(r["starts"][name], r["answer"]) for r in rows]
        saved, ratio, changed, runs, right = [], [], 0, 0, 0
        for r in rows:
            mine, base = r["replays"][name], r["replays"][BASELINE]
            saved.append(_mean(b.trials - m.trials for m, b in zip(mine, base, strict=True)))
            ratio.append(sum(m.tokens for m in mine) / sum(b.tokens for b in base))
            changed += sum(m.rank != b.rank for m, b in zip(mine, base, strict=True))
            right += sum(m.rank == r["answer"] for m in mine)
            runs += len(mine)
        out.append({
            "prior": name, "n": len(rows), "above": above, "below": below,
            "at": len(rows) - above - below, "abs": _mean(abs(d) for d in dist),
            "signed": _mean(dist), "saved": _mean(saved), "min_saved": min(saved),
            "ratio": _mean(ratio), "max_ratio": max(ratio), "changed": changed,
            "right": right, "runs": runs,
        })  # fmt: skip
    return out


# -- tables ---------------------------------------------------------------------------------


def features_table(rows: list[dict]) -> str:
    lines = [
        "| task @ steps x batch x seq_len | group | base params | LoRA params per rank | "
        "tokens per trial | dataset tokens | records | grid answer | "
        + " | ".join(PRIORS)
        + " | hindsight |",
        "|---|---|---|---|---|---|---|---|" + "---|" * (len(PRIORS) + 1),
    ]
    for r in rows:
        s, a = r["setting"], r["answer"]
        cells = []
        for n in [*PRIORS, HINDSIGHT]:
            st = r["starts"][n]
            d = doublings(st, a)
            cells.append(f"{st} ({d:+.0f})" if d else f"{st} (0)")
        lines.append(
            f"| {s.label} | {s.group} | {s.shape.n_params() / 1e6:.3g} M | {s.per_rank:,} | "
            f"{s.trial_tokens:,} | {s.dataset_tokens:,} | {s.records:,} | {a} | "
            + " | ".join(cells) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def replay_table(rows: list[dict]) -> str:
    lines = [
        "| task @ budget | group | answer | " + " | ".join(NAMES) + " |",
        "|---|---|---|" + "---|" * len(NAMES),
    ]
    for r in rows:
        s, base = r["setting"], r["replays"][BASELINE]
        cells = []
        for n in NAMES:
            mine = r["replays"][n]
            trials = _mean(m.trials for m in mine)
            ranks = "/".join(str(m.rank) + ("?" if m.undecided else "") for m in mine)
            delta = trials - _mean(b.trials for b in base)
            changed = sum(m.rank != b.rank for m, b in zip(mine, base, strict=True))
            cell = f"{trials:.3g} ({delta:+.2g}) → {ranks}"
            cells.append(cell + (f" ✗{changed}" if changed else ""))
        lines.append(f"| {s.label} | {s.group} | {r['answer']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(summ: list[dict], what: str) -> str:
    lines = [
        f"| prior | starts above / at / below the answer ({what}) | mean \\|doublings\\| | "
        "mean doublings | trials saved vs size-only: mean (worst task) | tokens vs size-only: "
        "mean (worst) | answers changed vs size-only | answers = grid's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in summ:
        lines.append(
            f"| {x['prior']} | {x['above']} / {x['at']} / {x['below']} of {x['n']} | "
            f"{x['abs']:.2f} | {x['signed']:+.2f} | {x['saved']:+.2f} ({x['min_saved']:+.2f}) | "
            f"{x['ratio']:.2f}x ({x['max_ratio']:.2f}x) | {x['changed']} of {x['runs']} | "
            f"{x['right']} of {x['runs']} |"
        )
    return "\n".join(lines)


def offset_table(rows: list[dict]) -> str:
    """Mean trials, and answers kept, by where the start sits relative to the answer (in
    doublings), over every listed start of every setting: what a prior's error costs."""
    groups = (("pools (new default)", True), ("one-seed curves", False))
    cells: dict[tuple[str, int], list] = {}
    for r in rows:
        base = [x.rank for x in r["replays"][BASELINE]]
        for start, got in r["by_start"].items():
            d = round(doublings(start, r["answer"]))
            g = groups[0][0] if r["setting"].pool else groups[1][0]
            cells.setdefault((g, d), []).append(
                (_mean(x.trials for x in got), [x.rank for x in got] == base)
            )
    offsets = sorted({d for _, d in cells})
    lines = [
        "| start − answer (doublings) | " + " | ".join(f"{d:+d}" for d in offsets) + " |",
        "|---|" + "---|" * len(offsets),
    ]
    for g, _ in groups:
        row = []
        for d in offsets:
            xs = cells.get((g, d), [])
            row.append(
                f"{_mean(t for t, _ in xs):.2f} ({sum(k for _, k in xs)}/{len(xs)})" if xs else "-"
            )
        lines.append(f"| {g}: mean trials (same answers as size-only / starts) | "
                     + " | ".join(row) + " |")  # fmt: skip
    return "\n".join(lines)


def fitted_constants(rows: list[dict]) -> str:
    """The fitted constants on all settings (what a prior fitted on every curve would use)."""
    train = [
        Known(r["setting"], r["answer"], {k: _mean(x.trials for x in v)
                                          for k, v in r["by_start"].items()})
        for r in rows
    ]  # fmt: skip
    const = _median_log2([k.answer for k in train])
    c_trial, c_data = fit_c(_trial)(train), fit_c(_data)(train)
    per = sorted(k.answer * k.setting.per_rank / k.setting.trial_tokens for k in train)
    return (
        f"Fitted on all {len(train)} settings: constant start 2^median(log2 answer) = "
        f"{const:.3g}; the constant start with the fewest trials = {fewest_target(train)}; "
        f"c x trial tokens: c = {c_trial:.3g}; c x data tokens: c = {c_data:.3g}. "
        f"The c each setting would need (answer x params per rank / trial tokens) spans "
        f"{per[0]:.3g} .. {per[-1]:.3g} ({math.log2(per[-1] / per[0]):.1f} doublings)."
    )


def report(rows: list[dict]) -> str:
    return "\n\n".join([
        "Starts (doublings from the grid's answer; fitted priors: leave one setting out):\n\n"
        + features_table(rows),
        fitted_constants(rows),
        "What a start costs, by its distance from the answer (every listed start replayed; "
        "cells: mean trials, and how many starts keep the size-only start's answers):\n\n"
        + offset_table(rows),
        "Replays from each start above (pools: new default, outer seeds 1-5; one-seed curves: "
        "Ladder(max_seeds=1)). Cells: mean trials (vs size-only) → answers; ✗n = answers that "
        "differ from the size-only start's:\n\n" + replay_table(rows),
        "Summary, the five pools (new default, 5 outer seeds each):\n\n"
        + summary_table(summary(rows, "pool"), "pools"),
        "Summary, the fifteen one-seed curves (search-cost and criterion):\n\n"
        + summary_table(summary(rows, "curves"), "curves"),
        "Summary, all settings:\n\n" + summary_table(summary(rows), "all"),
    ])  # fmt: skip


# -- checks that need torch -----------------------------------------------------------------
def _config(shape: Shape, family: str):
    """A transformers config with ``shape`` (the generators' layout), for PEFT to count."""
    from transformers import LlamaConfig, Qwen3Config

    cls = Qwen3Config if family == "qwen3" else LlamaConfig
    return cls(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        tie_word_embeddings=shape.tied,
    )  # fmt: skip


def check_params() -> str:
    """PEFT's count (``lora_param_count``) against :class:`Shape`: the stored pool models'
    own configs, configs built from the shapes without a stored model, and SmolLM2-135M's
    converted config in rankwise's cache when it is there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rankwise.analysis.params import lora_param_count
    from rankwise.io.models import _gguf_cache_dir, resolve_source

    cases = []  # (what, config, setting)
    for s in POOLS:
        folder = ROOT / ".cache" / s.name / "model"
        if (folder / "config.json").exists():
            cases.append((f"{s.name} (stored model)", AutoConfig.from_pretrained(folder), s))
    for s in (SEARCH_COST[4], SEARCH_COST[7]):  # planted-k32, planted2-k32: hidden 128
        family = "qwen3" if s.targets == ALL7 else "llama"
        cases.append((f"{s.name} (Shape as {family} config)", _config(s.shape, family), s))
    smol = _gguf_cache_dir(resolve_source("smollm2")) / "config.json"
    if smol.exists():
        cases.append(("SmolLM2-135M (rankwise's converted config)",
                      AutoConfig.from_pretrained(smol.parent), SEARCH_COST[8]))  # fmt: skip
    lines = []
    for what, config, s in cases:
        model = AutoModelForCausalLM.from_config(config)
        peft = lora_param_count(model, list(s.targets), rank=8)
        total = sum(p.numel() for p in model.parameters())
        lines.append(
            f"{what}, {'/'.join(t.split('_')[0] for t in s.targets)}: PEFT r=8 {peft:,}, "
            f"Shape {8 * s.per_rank:,} ({'same' if peft == 8 * s.per_rank else 'DIFFERENT'}); "
            f"base parameters {total:,} (Shape, without norms and biases: {s.shape.n_params():,})"
        )
    return "\n".join(lines)


def measure_corpora() -> str:
    """SmolLM2's training records and tokens for the two corpora, by rankwise's pipeline."""
    import tempfile

    from transformers import AutoTokenizer

    from bench import corpora
    from rankwise.config import DataConfig
    from rankwise.io.data import prepare_data
    from rankwise.io.models import _load_gguf, resolve_source

    tok = AutoTokenizer.from_pretrained(_load_gguf(resolve_source("smollm2"), False))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        readmes = corpora.package_readmes(Path(tmp) / "readmes.jsonl")
        for name, train in (("docstrings", "stdlib-docstrings"), ("readmes", str(readmes))):
            cfg = DataConfig(train=train, seq_len=64, max_examples=2000)
            data = prepare_data(cfg, tok, Path(tmp) / name, seed=0)
            learned = int((data.train_labels != -100).sum())
            line = f"{name}: {data.info['train_records']} train records, {learned:,} tokens"
            if name == "readmes":
                meta = json.loads(readmes.with_suffix(".json").read_text())
                line += f" (corpus: {meta['records']} records, {meta['chars']:,} characters)"
            out.append(line)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", type=Path, default=stability.POOLS, help="the pool JSONs")
    parser.add_argument("--check-params", action="store_true", help="PEFT's counts (torch)")
    parser.add_argument("--measure-corpora", action="store_true", help="SmolLM2 tokens (torch)")
    args = parser.parse_args(argv)
    if args.measure_corpora:
        print(measure_corpora())
        return 0
    pools = load_pools(args.pools)
    missing = [s.pool for s in POOLS if s.pool not in pools]
    if missing:
        print(f"pools missing from {args.pools} (run bench.stability): {', '.join(missing)}")
    print(report(measure(SETTINGS, pools)))
    if args.check_params:
        print("\n" + check_params())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
