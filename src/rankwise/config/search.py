"""The search's settings (``SearchConfig``): ranks, strategy, criterion, seeds, budgets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rankwise.config.fields import (
    DEFAULT_RANKS,
    VLLM_RANKS,
    _choice,
    _int_item,
    _integer,
    _positive,
    flag,
    opt,
    parse_duration,
    parse_serve,
    parse_size,
)
from rankwise.errors import ConfigError  # noqa: F401  (re-exported: the config's own error)


@dataclass
class SearchConfig:
    """How ranks are chosen, when to stop, and the budgets."""

    strategy: str = opt(
        "ladder",
        "ladder: start small and climb --ranks until the answer is settled under --criterion "
        "(then probe down if the smallest rank tried is the answer); grid: train every rank "
        "in --ranks; nested: one nested-rank run gives the whole curve, then one ordinary trial.",
        choices=["ladder", "grid", "nested"],
        everyday=(
            "ladder (climb the ranks until the answer is settled), grid (every rank) or nested."
        ),
    )
    ranks: list[int] = opt(
        DEFAULT_RANKS, "Candidate ranks, ascending.", everyday="Candidate ranks, e.g. 1,4,16,64."
    )
    start_rank: int | None = opt(
        None,
        "First rank the ladder trains. Default by base-model size (larger models often "
        "benefit from higher ranks): < 1B params: 4; < 10B: 8; else 16.",
        everyday="First rank the ladder trains (default: by model size).",
    )
    criterion: str = opt(
        "knee",
        "When a rank is as good as the best. knee: the top of the last step up the ranks "
        "that gains, per doubling of r, more than --threshold of the val loss (or of what "
        "--criterion-scale names); share: the smallest rank that reaches --threshold of the "
        "improvement over the base model that the best rank reached; relative: the smallest "
        "rank whose val loss is within --threshold of the best, relative to the loss. "
        "Decides the rank, target sets and co-tuning.",
        choices=["knee", "share", "relative"],
        everyday="When a rank is as good as the best: knee, share or relative.",
    )
    threshold: float | None = opt(
        None,
        "The criterion's threshold; default: knee 0.005 of the val loss per doubling (0.01 "
        "with --criterion-scale base, 0.1 with range), share 0.99, relative 0.01 "
        "(bench/RESULTS.md, 'An answer a user can act on' and 'Criterion').",
    )
    patience: int = opt(
        1,
        "Consecutive settled steps (more rank would not change the answer) before the ladder stops.",
    )
    max_rank: int | None = opt(
        None,
        "Largest rank allowed (serving cap: vLLM's max_lora_rank defaults to 16).",
        identity=False,
        everyday="Largest rank allowed (a serving cap).",
    )
    serve: str | None = opt(
        None,
        "The server the adapter is for: vllm (ranks vLLM loads, 1, 8, 16, 32, 64, 128, 256, "
        "320, 512, up to its default --max-lora-rank 16) or vllm:MAX (up to MAX). Only those "
        "ranks are candidates, per-layer patterns are rounded up into them, and the answer "
        "gives the --max-lora-rank to start vLLM with.",
    )
    trial_budget: float = opt(
        1.0,
        "Train each trial on this share of the training budget (--epochs or --max-steps, as "
        "a recipe gives them); the answer says which budget it holds for.",
    )
    max_trainable_params: int | None = opt(
        None, "Skip ranks whose adapter has more trainable parameters.", identity=False
    )
    max_time: Any = opt(
        None,
        "Wall-time budget of the whole search (e.g. 30m, 2h, or seconds).",
        identity=False,
        everyday="Wall-time budget of the whole search, e.g. 30m or 2h.",
    )
    max_trial_time: Any = opt(
        None,
        "Stop a trial after this long and score it on what it reached (flagged).",
        identity=False,
    )
    max_memory: Any = opt(
        None,
        "Skip ranks whose predicted peak training memory exceeds this (e.g. 20GiB).",
        identity=False,
    )
    max_adapter_size: Any = opt(
        None, "Skip ranks whose adapter file would exceed this (e.g. 50MB).", identity=False
    )
    max_forgetting: float | None = opt(
        None,
        "Ranks whose retain-loss increase over the base model (nats/token, on the retain set "
        "of --retain) exceeds this are not eligible: known only after training, they are "
        "recorded as skipped with the figure measured, and the criterion chooses among the rest "
        "(so a resumed search must keep the same limit).",
    )
    seeds: int = opt(
        1,
        "Train each rank with N seeds (adapter init and data order); scores become "
        "mean ± standard error and a gain must beat the noise (Student's t at its degrees of "
        "freedom).",
        everyday="Seeds per rank; scores become mean ± standard error.",
    )
    max_seeds: int = opt(
        3,
        "Racing: the start rank is trained with 2 seeds to measure the seed-to-seed noise, and "
        "when a comparison the answer rests on is within the t half-width of its paired "
        "difference, both ranks get more seeds, up to this many. 1: one seed per rank, noise "
        "unmeasured.",
        everyday="Seeds a close comparison is raced up to (1: no racing).",
    )
    stop_when_decided: bool = opt(
        False,
        "Stop a trial of the rank curve once no final val loss within reach of it can change "
        "the answer (its paired gap to a finished trial of the same seed, ± the largest late "
        "move of such a gap measured on the benchmarks or in this run); the search is told "
        "the predicted loss, and show lists the evidence. Needs --executor local. Saves "
        "0-13% of the tokens on the benchmarks, with no answer changed (bench/RESULTS.md).",
    )
    criterion_scale: str | None = opt(
        None,
        "What the criterion's share is a share of: base (the improvement over the base "
        "model), range (the improvement from the smallest rank tried to the best; does not "
        "shrink when the base model is far off the data), loss (the val loss). Default: "
        "knee and relative: loss; share: base.",
        choices=["base", "range", "loss"],
    )
    max_regret: float = opt(
        0.01,
        "The guarantee: the recommended rank loses at most this share of the val loss to the "
        "best rank the search trained, shown beyond the noise (0.01 = 1%). The criterion may "
        "choose a smaller rank only inside it; the ladder climbs until the step above the "
        "answer is shown to gain less.",
    )
    tune: list[str] | None = opt(
        None,
        "After the rank is chosen, co-tune these around it (dropout: 0/0.05/0.1; alpha: "
        "lora_alpha = 1r/2r/4r and rsLoRA) at the chosen and the next rank; reports whether "
        "that changes the choice.",
    )
    compare_targets: list[str] | None = opt(
        None,
        "Also run the ladder for these target sets (attention, mlp, all-linear, or "
        "module names joined by '+', e.g. q_proj+v_proj) and pick the best (targets, rank) "
        "per trainable parameter (LoRA paper, Table 5: more matrices at lower rank can win).",
    )
    per_layer: bool = opt(
        False,
        "After the rank r is chosen, propose per-module ranks (rank_pattern) two ways: from "
        "the chosen adapter's spectra (each module keeps --per-layer-energy of its update's "
        "energy) and by PEFT's EVA initialisation at that pattern's rank budget. Each is "
        "trained with the same data, steps and seeds; the fewest trainable parameters whose "
        "score is as good as r's (by --criterion and the noise) is recommended and delivered.",
    )
    per_layer_energy: float = opt(
        0.99,
        "--per-layer: share of each module's update energy (squared singular values of "
        "scaling*B@A) the spectral pattern keeps. On a planted task (r=32, all-linear) "
        "0.9/0.95/0.99 kept 16%/20%/33% of the parameters at +1.1%/+0.9%/+0.3% val loss.",
    )
    final: bool = opt(
        True,
        "nested strategy: train one ordinary adapter at the recommended rank at the end "
        "(--no-final delivers the truncated nested adapter).",
    )
    final_init: str = opt(
        "fresh",
        "nested strategy: the final trial starts from a fresh adapter, or from the nested "
        "run's truncation at the recommended rank (nested; it keeps the truncation's "
        "lora_alpha, so the delivered config reproduces the scale it was trained at).",
        choices=["fresh", "nested"],
    )
    final_steps: float = opt(
        1.0,
        "nested strategy: the final trial's steps as a share of --max-steps (0.5 = half; "
        "with --final-init nested the run already trained those components).",
    )
    nested_scale: str = opt(
        "policy",
        "nested strategy: the LoRA scale of each drawn rank b. policy: the alpha policy's "
        "scale of a rank-b adapter (fixed alpha: alpha/b); shared: one scale for every "
        "truncation, the policy's scale at the geometric middle of --ranks, so a larger "
        "truncation only adds components to a smaller one.",
        choices=["policy", "shared"],
    )
    nested_distribution: str = opt(
        "uniform-list",
        "nested strategy: how each step draws its rank (uniform over --ranks, i.e. log-uniform "
        "in r; or uniform-r).",
        choices=["uniform-list", "uniform-r"],
    )
    branch_at: float | None = opt(
        None,
        "Branched trials: the first trial of each seed on the rank curve (the trunk) saves "
        "its adapter, optimizer and data position at this share of --max-steps; every other "
        "rank of that seed starts there (grown: new components at B = 0, the update "
        "unchanged; shrunk: its SVD truncation) and trains the rest of the same schedule, "
        "so it costs 1 - F of a trial. Each seed has its own trunk, so the seeds' spread "
        "stays that of whole trials. Off by default: bench/RESULTS.md ('Branched trials').",
    )

    def __post_init__(self):
        _choice(self, "strategy")
        if isinstance(self.ranks, str):
            self.ranks = [_int_item(s, "ranks") for s in self.ranks.split(",") if s.strip()]
        if not isinstance(self.ranks, list) or not self.ranks:
            raise ConfigError(
                f"--ranks: expected a comma-separated list of ranks, got {self.ranks!r}"
            )
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise ConfigError(f"--ranks: every rank must be a positive integer, got {r!r}")
        self.ranks = sorted(set(self.ranks))
        self._serve_ranks()
        tb = self.trial_budget
        if isinstance(tb, bool) or not isinstance(tb, int | float) or not 0 < tb <= 1:
            raise ConfigError(f"--trial-budget: expected a share in (0, 1], got {tb!r}")
        _integer(self, "start_rank", "patience", "max_rank", "max_trainable_params", "seeds")
        _positive(self, "start_rank", "patience", "max_rank", "max_trainable_params", "seeds")
        _integer(self, "max_seeds")
        if self.max_seeds < max(1, self.seeds):
            raise ConfigError(
                f"--max-seeds: expected at least --seeds ({self.seeds}) and at least 1, "
                f"got {self.max_seeds}"
            )
        self.search_criterion()  # a bad criterion or threshold fails here, naming the flag
        if self.max_rank is not None and self.max_rank < self.ranks[0]:
            raise ConfigError(
                f"--max-rank: {self.max_rank} is below the smallest rank in --ranks "
                f"({self.ranks[0]}); allowed: {self.ranks[0]} or more"
            )
        for name in ("nested_distribution", "nested_scale", "final_init"):
            _choice(self, name)
        ba = self.branch_at
        if ba is not None and (
            isinstance(ba, bool) or not isinstance(ba, int | float) or not 0 < ba < 1
        ):
            raise ConfigError(f"--branch-at: expected a share of --max-steps in (0, 1), got {ba!r}")
        if ba is not None and self.strategy == "nested":
            raise ConfigError(
                "--branch-at: not with --strategy nested (a nested run trains every rank in "
                "one run already; branching shares the first steps of separate trials)"
            )
        fs = self.final_steps
        if isinstance(fs, bool) or not isinstance(fs, int | float) or not 0 < fs <= 1:
            raise ConfigError(
                f"--final-steps: expected a share of --max-steps in (0, 1], got {fs!r}"
            )
        energy = self.per_layer_energy
        if isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1:
            raise ConfigError(
                f"--per-layer-energy: expected a share of the energy in (0, 1], got {energy!r}"
            )
        for name in ("tune", "compare_targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
                setattr(self, name, value)
            if value is not None and not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{flag(name)}: expected a comma-separated list, got {value!r}")
        bad = [t for t in self.tune or [] if t not in ("dropout", "alpha")]
        if bad:
            raise ConfigError(f"--tune: expected dropout and/or alpha, got {bad[0]!r}")
        self.max_time = parse_duration(self.max_time, "max_time")
        self.max_trial_time = parse_duration(self.max_trial_time, "max_trial_time")
        self.max_memory = parse_size(self.max_memory, "max_memory")
        self.max_adapter_size = parse_size(self.max_adapter_size, "max_adapter_size")
        _positive(self, "max_forgetting")
        if self.start_rank is not None and self.start_rank not in self.ranks:
            raise ConfigError(
                f"--start-rank: {self.start_rank} is not in --ranks {','.join(map(str, self.ranks))}"
                + (f" (the ranks --serve {self.serve} loads)" if self.serve else "")
            )

    def _serve_ranks(self) -> None:
        """--serve: keep the ranks the server loads, up to its max (--max-rank still caps)."""
        served = parse_serve(self.serve)
        if served is None:
            return
        cap = served[1]
        ranks = [r for r in self.ranks if r in VLLM_RANKS and r <= cap]
        if not ranks:
            raise ConfigError(
                f"--serve {self.serve}: none of --ranks {','.join(map(str, self.ranks))} is a "
                f"rank vLLM loads up to {cap} ({', '.join(str(r) for r in VLLM_RANKS if r <= cap)})"
            )
        self.ranks = ranks

    @property
    def max_lora_rank(self) -> int | None:
        """The --serve cap (vLLM's --max-lora-rank), or None without --serve."""
        served = parse_serve(self.serve)
        return served[1] if served else None

    def search_criterion(self):
        """The :class:`rankwise.core.criteria.Criterion` these options name."""
        from rankwise.core.criteria import Criterion

        return Criterion(self.criterion, self.threshold, self.criterion_scale, self.max_regret)

    def start_rank_for(self, n_params: int) -> int:
        """--start-rank, or the rule by model size, snapped to the nearest rank in --ranks."""
        if self.start_rank is not None:
            return self.start_rank
        target = 4 if n_params < 1e9 else 8 if n_params < 1e10 else 16
        return min(self.ranks, key=lambda r: (abs(math.log2(r / target)), r))
