"""``Options``: every group of settings together, as flags, YAML keys and keywords."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rankwise.config.groups import (
    DataConfig,
    ExecutorConfig,
    LoraSettings,
    ModelConfig,
    RunConfig,
    TrainConfig,
)
from rankwise.config.search import SearchConfig
from rankwise.errors import ConfigError  # noqa: F401  (re-exported: the config's own error)

GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "lora": LoraSettings,
    "train": TrainConfig,
    "search": SearchConfig,
    "run": RunConfig,
    "executor": ExecutorConfig,
}


@dataclass
class Options:
    """All options of a search, grouped. Build with :meth:`from_flat`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    run: RunConfig = field(default_factory=RunConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)

    @classmethod
    def field_index(cls) -> dict[str, str]:
        """Flat option name -> group name."""
        return {f.name: g for g, klass in GROUPS.items() for f in dataclasses.fields(klass)}

    @classmethod
    def from_flat(cls, values: dict[str, Any], source: str = "") -> Options:
        """Build from flat keys (``rank``-style names, as in YAML and kwargs)."""
        index = cls.field_index()
        grouped: dict[str, dict[str, Any]] = {g: {} for g in GROUPS}
        for key, value in values.items():
            norm = key.replace("-", "_")
            if norm not in index:
                where = f"{source}: " if source else ""
                raise ConfigError(f"{where}unknown option {key!r}")
            grouped[index[norm]][norm] = value
        return cls(**{g: GROUPS[g](**kw) for g, kw in grouped.items()})

    def __post_init__(self):
        # Options that are valid alone but not together.
        seq_cls = self.model.task == "seq-cls"
        if self.train.metric != "loss" and not seq_cls:
            raise ConfigError(
                f"--metric {self.train.metric}: needs --task seq-cls (a causal LM is scored by "
                "its loss)"
            )
        if seq_cls and self.data.format not in ("auto", "text"):
            raise ConfigError(
                f"--format {self.data.format}: --task seq-cls reads --text-field and "
                "--label-field; expected --format auto or text"
            )
        if self.search.stop_when_decided and self.executor.executor != "local":
            raise ConfigError(
                "--stop-when-decided: needs --executor local (the search decides at each "
                "evaluation of a running trial, in this process)"
            )
        if self.lora.use_dora and self.search.strategy == "nested":
            raise ConfigError(
                "--use-dora: --strategy nested trains plain LoRA only (its truncations mask "
                "the rank of B·A, which DoRA renormalises per output feature); use --strategy "
                "ladder or grid"
            )
        if seq_cls and self.search.strategy == "nested":
            raise ConfigError(
                "--strategy nested: supports --task causal-lm only (every truncation would "
                "share one classifier head trained at whichever rank each step drew)"
            )
        if self.lora.target_parameters:
            self._check_target_parameters()

    def _check_target_parameters(self) -> None:
        """What PEFT's LoRA on parameters (ParamWrapper, peft 0.17+) cannot train."""
        if self.search.strategy == "nested":
            raise ConfigError(
                "--strategy nested: not with --target-parameters (a nested run truncates each "
                "module's rank directions; an expert parameter's factors hold every expert's)"
            )
        if "dropout" in (self.search.tune or []):
            raise ConfigError("--tune dropout: --target-parameters takes no dropout (PEFT)")
        if self.lora.use_dora:
            raise ConfigError("--use-dora: PEFT has no DoRA for --target-parameters")

    def to_flat(self) -> dict[str, Any]:
        return {k: v for g in GROUPS for k, v in dataclasses.asdict(getattr(self, g)).items()}

    def updated(self, values: dict[str, Any], source: str = "") -> Options:
        """A copy with ``values`` (flat keys, as :meth:`from_flat` takes) over these options,
        checked again as a whole.

        Example:
            >>> Options().updated({"ranks": "4,1", "seed": 3}).search.ranks
            [1, 4]
        """
        return Options.from_flat({**self.to_flat(), **values}, source)

    def identity(self) -> dict[str, Any]:
        """Every option that determines results, defaults included, as resolved now.

        A resumed run must match it exactly: a default that changed between versions is a
        difference like any other (the run directory also stores a fingerprint of the data).
        """
        return {
            f.name: getattr(getattr(self, g), f.name)
            for g, klass in GROUPS.items()
            for f in dataclasses.fields(klass)
            if f.metadata.get("identity", True)
        }
