"""Plain, serialisable records exchanged between the search, the trials and the store.

No torch here: the search core and the store use these, and a remote worker
receives a :class:`TrialSpec` as JSON and sends back a :class:`TrialResult`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = ["TrialSpec", "TrialResult", "COMPLETE", "FAILED", "SKIPPED", "OUT_OF_MEMORY"]

COMPLETE = "complete"
FAILED = "failed"
SKIPPED = "skipped"
OUT_OF_MEMORY = "out of memory"


@dataclass(frozen=True)
class TrialSpec:
    """Everything one trial needs, as plain data.

    ``lora`` holds the keyword arguments of ``peft.LoraConfig`` (with ``r``), so
    what PEFT is asked to build is exactly what is recorded.
    """

    key: str
    rank: int
    seed: int
    lora: dict[str, Any]
    train: dict[str, Any]
    model: dict[str, Any]
    data_dir: str
    group: str = ""
    adapter_dir: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrialSpec:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class TrialResult:
    """What a trial produced. A failure is a result with ``status='failed'`` and a reason."""

    key: str
    rank: int
    seed: int
    status: str
    reason: str = ""
    group: str = ""
    lora_alpha: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None
    final_train_loss: float | None = None
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    trainable_params: int | None = None
    steps: int = 0
    train_tokens: int = 0
    wall_seconds: float = 0.0
    setup_seconds: float = 0.0
    step_seconds: float | None = None
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    time_limited: bool = False
    predicted: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == COMPLETE and self.best_val_loss is not None

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
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def replace(self, **changes) -> TrialResult:
        return dataclasses.replace(self, **changes)
