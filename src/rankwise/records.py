"""Plain, serialisable records exchanged between the search, the trials and the store.

No torch here: the search core and the store use these, and a remote worker
receives a :class:`TrialSpec` as JSON and sends back a :class:`TrialResult`.

Example (a spec survives the round trip to JSON with its typed parts):
    >>> spec = TrialSpec(key="r4-s0", rank=4, seed=0, lora=LoraSpec(r=4, lora_alpha=16),
    ...                  train=TrainSpec(max_steps=10), model={"model": "smollm2"}, data_dir="d")
    >>> TrialSpec.from_json(spec.to_json()) == spec
    True
    >>> TrialKind("nested").on_curve, TrialKind.CALIBRATION.on_curve
    (True, False)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "TrialKind",
    "Variant",
    "MAIN",
    "LoraSpec",
    "TrainSpec",
    "Branch",
    "NestedRun",
    "TrialSpec",
    "TrialResult",
    "COMPLETE",
    "FAILED",
    "SKIPPED",
    "OUT_OF_MEMORY",
]

COMPLETE = "complete"
FAILED = "failed"
SKIPPED = "skipped"
OUT_OF_MEMORY = "out of memory"


class TrialKind(StrEnum):
    """What a trial is for. Only ``main`` and ``nested`` trials make the rank curve."""

    BASE = "base"  # the base model without an adapter: the "r=0" point
    CALIBRATION = "calibration"  # a short run at a candidate learning rate
    MAIN = "main"  # one rank of the rank curve
    NESTED = "nested"  # one truncation of a nested-rank run (also the curve)
    COTUNE = "cotune"  # dropout/alpha variants around the chosen rank
    TARGETS = "targets"  # the ladder of another target set
    PER_LAYER = "per-layer"  # a per-module rank pattern at the chosen rank
    FINAL = "final"  # the ordinary trial after a nested curve

    @property
    def on_curve(self) -> bool:
        return self in (TrialKind.MAIN, TrialKind.NESTED)


@dataclass(frozen=True)
class Variant:
    """A departure from the run's settings for some trials. Trials of a variant are stored
    under its ``group`` (part of their key); the rank curve is the ``main`` kind."""

    kind: TrialKind = TrialKind.MAIN
    group: str = ""
    lr: float | None = None
    max_steps: int | None = None
    lora: tuple = ()  # (LoraSpec field, value) overrides
    init_adapter: str | None = None  # start from this adapter folder (a warm start)


MAIN = Variant()


@dataclass(frozen=True)
class LoraSpec:
    """The keyword arguments of ``peft.LoraConfig`` a trial asks for (the rank included)."""

    r: int
    lora_alpha: float
    target_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    init_lora_weights: bool | str = True
    use_dora: bool = False
    eva_config: dict[str, Any] | None = None  # peft.EvaConfig fields, with init "eva"
    # Parameters PEFT wraps directly (ParamWrapper): a mixture-of-experts model's fused 3-D
    # expert weights, which no target_modules reaches. ``r`` is then the rank of each expert.
    target_parameters: list[str] | None = None

    def kwargs(self) -> dict[str, Any]:
        """``LoraConfig(**spec.kwargs())`` builds exactly what was recorded."""
        return dataclasses.asdict(self)

    def replace(self, **changes) -> LoraSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrainSpec:
    """How one trial trains: identical for every rank of a search (see TrainConfig)."""

    max_steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 20
    eval_batches: int | None = None
    seed: int = 0
    max_trial_time: float | None = None
    autocast: str | None = None  # "bfloat16": autocast the forward/backward; weights stay fp32
    metric: str = "loss"  # what evaluations score: loss, accuracy or f1 (rankwise.core.metrics)
    # Stop after this many evaluations without a new best (by more than the threshold).
    early_stopping_patience: int | None = None
    early_stopping_threshold: float = 0.0
    init_adapter: str | None = None  # a PEFT adapter folder (same rank) the trial starts from
    # The learning-rate schedule (a transformers get_scheduler type) and the arguments it
    # gets, --min-lr-ratio included; "linear" is rankwise's own (rankwise.training.schedule).
    lr_scheduler: str = "linear"
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    neftune_alpha: float | None = None  # NEFTune's noise on the input embeddings, in training

    def replace(self, **changes) -> TrainSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class NestedRun:
    """A nested-rank run (``--strategy nested``): the truncations one adapter at
    ``max(ranks)`` trains at once, each truncation's LoRA scale under the alpha policy, and
    how the rank of each step is drawn. Plain data, so the run travels in its spec.

    >>> n = NestedRun(ranks=(1, 4), scales=(8.0, 2.0))
    >>> n.scale_for(4), n.distribution
    (2.0, 'uniform-list')
    """

    ranks: tuple[int, ...]
    scales: tuple[float, ...]
    distribution: str = "uniform-list"

    def __post_init__(self):
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        object.__setattr__(self, "scales", tuple(float(x) for x in self.scales))

    def scale_for(self, rank: int) -> float:
        """The LoRA scale of the rank-``rank`` truncation."""
        return dict(zip(self.ranks, self.scales, strict=True))[rank]


@dataclass(frozen=True)
class Branch:
    """A trial of the rank curve that shares its first steps with its seed's trunk
    (``--branch-at``). The trunk (``role="trunk"``, the first trial of its seed) saves its
    whole training state after optimizer step ``step`` in ``checkpoint``; every other rank of
    that seed starts there and trains the rest of the same schedule on the same data order:
    ``grown`` (more rank: new components with B = 0, the update unchanged), ``shrunk`` (less
    rank: the SVD truncation of the trunk's update) or ``continued`` (the trunk's own rank).

    >>> b = Branch(trunk="r4-s0", step=50, role="grown", trunk_rank=4, checkpoint="c")
    >>> b.describe(), b.is_trunk
    ('branch of r4-s0 @ step 50 (grown from r=4)', False)
    """

    trunk: str  # the trunk trial's key
    step: int  # the optimizer step after which the trunk's state is saved
    role: str  # trunk, grown, shrunk or continued
    trunk_rank: int
    checkpoint: str  # the folder of the trunk's saved state (rankwise.storage.rundir)

    @property
    def is_trunk(self) -> bool:
        return self.role == "trunk"

    def describe(self) -> str:
        if self.is_trunk:
            return f"trunk: its state at step {self.step} is where this seed's other ranks start"
        return f"branch of {self.trunk} @ step {self.step} ({self.role} from r={self.trunk_rank})"


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs, as plain data."""

    key: str
    rank: int
    seed: int
    lora: LoraSpec
    train: TrainSpec
    model: dict[str, Any]
    data_dir: str
    kind: TrialKind = TrialKind.MAIN
    group: str = ""  # the label of a variant (a learning rate, a target set, a co-tune setting)
    adapter_dir: str | None = None
    branch: Branch | None = None  # --branch-at: the trunk saves its state, a branch starts there
    nested: NestedRun | None = None  # --strategy nested: the truncations this run trains

    def __post_init__(self):
        # Plain dicts (from JSON, or written by hand) become the typed records.
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraSpec(**self.lora))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", TrainSpec(**self.train))
        if isinstance(self.branch, dict):
            object.__setattr__(self, "branch", Branch(**self.branch))
        if isinstance(self.nested, dict):
            object.__setattr__(self, "nested", NestedRun(**self.nested))
        object.__setattr__(self, "kind", TrialKind(self.kind))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrialSpec:
        return cls(**json.loads(text))

    def replace(self, **changes) -> TrialSpec:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TrialResult:
    """What a trial produced. A failure is a result with ``status='failed'`` and a reason."""

    key: str
    rank: int
    seed: int
    status: str
    reason: str = ""
    kind: TrialKind = TrialKind.MAIN
    group: str = ""
    lora_alpha: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    final_train_loss: float | None = None
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    metric: str = "loss"
    """What ``val_curve`` and ``best_val_loss`` hold: ``loss``, or ``accuracy``/``f1`` as the
    error ``1 - metric`` (lower is better, as the search compares; rankwise.core.metrics)."""
    val_metrics: dict[str, float] = field(default_factory=dict)
    """Every metric measured at the best checkpoint, as users read them (classification)."""
    val_loss_curve: list[tuple[int, float]] = field(default_factory=list)
    """Validation loss at each evaluation, when ``val_curve`` holds an error instead."""
    trainable_params: int | None = None
    steps: int = 0
    train_tokens: int = 0
    wall_seconds: float = 0.0
    setup_seconds: float = 0.0
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    time_limited: bool = False
    early_stopped: bool = False
    predicted: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    val_blocks: list[float] = field(default_factory=list)
    """Validation loss of each validation block at the best checkpoint: the paired
    per-block differences between two ranks give their validation-sampling noise."""
    forgetting: float | None = None
    """What the adapter costs the base model: the increase of the loss on the retain set
    over the base model's, at the best checkpoint (nats/token; rankwise.training.retain)."""
    forgetting_kl: float | None = None
    """Mean KL(base || adapted) of the next-token distributions on the retain set (nats)."""
    retain_seconds: float = 0.0
    """Wall time of the retain evaluation (not part of ``wall_seconds``)."""
    branch: Branch | None = None
    """--branch-at: the trunk this trial branched from (its first ``branch.step`` steps are
    the trunk's, not counted in ``train_tokens``), or the trunk's own record."""

    def __post_init__(self):
        object.__setattr__(self, "kind", TrialKind(self.kind))
        if isinstance(self.branch, dict):
            object.__setattr__(self, "branch", Branch(**self.branch))

    @classmethod
    def of(cls, spec: TrialSpec, status: str, reason: str = "", **fields) -> TrialResult:
        """A record of ``spec`` (its key, rank, seed, kind, group and alpha) with ``fields``."""
        base = dict(
            key=spec.key,
            rank=spec.rank,
            seed=spec.seed,
            kind=spec.kind,
            group=spec.group,
            lora_alpha=spec.lora.lora_alpha,
        )
        return cls(status=status, reason=reason, **{**base, **fields})

    @property
    def ok(self) -> bool:
        return self.status == COMPLETE and self.best_val_loss is not None

    @property
    def on_curve(self) -> bool:
        return self.kind.on_curve

    @property
    def out_of_memory(self) -> bool:
        return self.status == FAILED and self.reason.startswith(OUT_OF_MEMORY)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrialResult:
        d = json.loads(text)
        d["train_curve"] = [tuple(p) for p in d.get("train_curve", [])]
        d["val_curve"] = [tuple(p) for p in d.get("val_curve", [])]
        d["val_loss_curve"] = [tuple(p) for p in d.get("val_loss_curve", [])]
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes) -> TrialResult:
        return dataclasses.replace(self, **changes)
