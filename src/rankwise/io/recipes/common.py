"""What the three recipe readers share: the file's keys read one at a time (each use named,
each bad value refused naming its key), the warnings, and the data sources.

A reader turns a tool's keys into rankwise's flat options (the keys of ``--config`` and the
keyword arguments of ``rankwise.search``). A key that changes what a trial learns but that
the search cannot honour becomes one warning; a key that cannot be read is a
:class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankwise.config.schedules import SCHEDULERS
from rankwise.errors import ConfigError

__all__ = ["Keys", "Recipe", "data_source", "lora_targets"]

# Local data files rankwise reads (rankwise.io.readers): a path with one of these suffixes
# is a file, never a hub id.
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
# Optimizer names that are torch AdamW, the optimizer every trial uses.
ADAMW = (None, "adamw_torch", "adamw_torch_fused", "adamw_hf")
# transformers TrainingArguments keys, read the same way from LLaMA-Factory and TRL recipes.
TRAINER_KEYS = {
    "per_device_train_batch_size": "--batch-size (default 8)",
    "gradient_accumulation_steps": "--grad-accum (default 1)",
    "lr_scheduler_type": "--lr-scheduler (default linear)",
    "lr_scheduler_kwargs": "--lr-scheduler-kwargs",
    "warmup_steps": "--warmup-steps",
    "warmup_ratio": "--warmup-ratio",
    "num_train_epochs": "--epochs (default 3)",
    "max_steps": "--max-steps (overrides num_train_epochs)",
    "seed": "--seed (default 42)",
    "weight_decay": "--weight-decay",
    "max_grad_norm": "--max-grad-norm",
}


@dataclass
class Recipe:
    """A training config read as rankwise options."""

    tool: str  # axolotl, llama-factory or trl
    path: Path
    options: dict[str, Any]  # flat rankwise options
    warnings: list[str] = field(default_factory=list)


class Keys:
    """The recipe's mapping, read key by key, with the options and warnings it yields."""

    def __init__(self, data: dict, path: Path, tool: str):
        self.data, self.path, self.tool = data, path, tool
        self.options: dict[str, Any] = {}
        self.warnings: list[str] = []

    def __contains__(self, key: str) -> bool:
        return self.data.get(key) is not None

    def error(self, key: str, expected: str) -> ConfigError:
        got = self.data.get(key)
        return ConfigError(f"--from {self.path}: {key}: expected {expected}, got {got!r}")

    def get(self, key: str, default: Any = None) -> Any:
        value = self.data.get(key)
        return default if value is None else value

    def number(self, key: str, default: Any = None, *, integer: bool = False) -> Any:
        """A number (YAML may hold '2e-4' as a string: axolotl's schema reads it as one)."""
        value = self.get(key, default)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise self.error(key, "a number") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, "a number")
        if integer:
            if value != int(value):
                raise self.error(key, "an integer")
            return int(value)
        return value

    def set(self, option: str, key: str, default: Any = None, *, integer: bool = False):
        """rankwise ``option`` := the number at ``key`` (or the tool's ``default``)."""
        value = self.number(key, default, integer=integer)
        if value is not None:
            self.options[option] = value

    def warn(self, key: str, why: str) -> None:
        value = self.data.get(key)
        shown = "" if value is None else f" {value}"
        self.warnings.append(f"{self.tool} {key}{shown}: {why}")

    def warn_if(self, key: str, why: str, *, unless: Any = (None, False)) -> None:
        """Warn when ``key`` is set to anything but the values in ``unless``."""
        if self.data.get(key) not in unless:
            self.warn(key, why)

    def warn_unpacked(self, packed: bool, key: str, length_key: str) -> None:
        """The recipe trains on unpacked examples; a trial packs them into blocks."""
        if not packed:
            self.warnings.append(
                f"{self.tool} {key} false: rankwise packs examples into blocks of {length_key} "
                "tokens; trials see the same tokens in fewer, fuller batches"
            )

    def warn_beyond_a_trial(
        self, *, modules_to_save: str, distributed: tuple[str, ...], optimizer: str
    ) -> None:
        """The keys every tool has that a trial cannot honour: modules trained beside LoRA,
        several devices, an optimizer other than AdamW, remote code."""
        unset = (None, False, "", [])
        self.warn_if(modules_to_save, "the search trains the LoRA matrices only", unless=unset)
        for key in distributed:
            why = "a trial runs on one device; losses match, speed and memory do not"
            self.warn_if(key, why, unless=unset)
        self.warn_if(optimizer, "trials use torch AdamW", unless=ADAMW)
        self.warn_if("trust_remote_code", "not passed on; give --trust-remote-code to allow it")

    def budget(self, epochs_key: str, steps_key: str, default_epochs: float) -> None:
        """max_steps when positive (it overrides the epochs, as in HF's Trainer), else epochs."""
        steps = self.number(steps_key, integer=True)
        if steps is not None and steps > 0:
            self.options["max_steps"] = steps
        else:
            self.options["epochs"] = self.number(epochs_key, default_epochs)
            if self.options["epochs"] <= 0:
                raise self.error(epochs_key, "a positive number of epochs")

    def warmup(self, steps_key: str = "warmup_steps", ratio_key: str = "warmup_ratio") -> None:
        """warmup_steps when positive (HF: it overrides the ratio), else warmup_ratio, else 0."""
        steps = self.number(steps_key, integer=True)
        ratio = self.number(ratio_key)
        if steps:
            self.options["warmup_steps"] = steps
        elif ratio:
            self.options["warmup_ratio"] = ratio
        else:
            self.options["warmup_steps"] = 0

    def scheduler(self, key: str, default: str, kwargs_key: str = "lr_scheduler_kwargs") -> None:
        """The schedule as --lr-scheduler (transformers' get_scheduler types) and its
        arguments as --lr-scheduler-kwargs; a schedule transformers has not is warned about."""
        kind = self.get(key, default)
        if kind not in SCHEDULERS:
            self.warnings.append(
                f"{self.tool} {key} {kind}: not a transformers schedule; trials use "
                "rankwise's linear warm-up then linear decay"
            )
            return
        self.options["lr_scheduler"] = kind
        kwargs = self.get(kwargs_key)
        if isinstance(kwargs, str):  # TrainingArguments also takes it as a JSON string
            try:
                kwargs = json.loads(kwargs)
            except json.JSONDecodeError:
                raise self.error(kwargs_key, "a mapping of the schedule's arguments") from None
        if kwargs in (None, {}):
            return
        if not isinstance(kwargs, dict):
            raise self.error(kwargs_key, "a mapping of the schedule's arguments")
        self.options["lr_scheduler_kwargs"] = dict(kwargs)

    def neftune(self, key: str = "neftune_noise_alpha") -> None:
        """NEFTune's noise alpha as --neftune-alpha (0, like absent, adds no noise)."""
        alpha = self.number(key)
        if alpha is not None and alpha < 0:
            raise self.error(key, "a positive noise alpha (NEFTune)")
        if alpha:
            self.options["neftune_alpha"] = alpha

    def dora(self, key: str) -> None:
        """PEFT's use_dora as --use-dora."""
        value = self.get(key, False)
        if not isinstance(value, bool):
            raise self.error(key, "true or false")
        if value:
            self.options["use_dora"] = True

    def target_parameters(self, key: str) -> None:
        """PEFT's ``target_parameters`` (a mixture of experts' fused weights) as
        --target-parameters."""
        value = self.get(key)
        if value in (None, []):
            return
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise self.error(key, "parameter names (a list, or names joined by commas)")
        self.options["target_parameters"] = value

    def quantize(self, bits: int | None, key: str) -> None:
        if bits is None:
            return
        if bits not in (4, 8):
            raise self.error(key, "4 or 8 bits (bitsandbytes)")
        self.options["quantize"] = f"{bits}bit"

    def resolve(self, value: str, key: str) -> Path | None:
        """A local file or directory the key names: as given (from the working directory, as
        the tool reads it), else next to the recipe; None if neither exists."""
        given = Path(str(value)).expanduser()
        for candidate in (given, self.path.parent / given):
            if candidate.exists():
                return candidate
        return None


def data_source(keys: Keys, value: Any, key: str) -> str:
    """A dataset path as ``--train`` takes it: an existing local file or directory, or a hub
    id; a path that looks local (a data suffix, ./, /, ~) and does not exist is refused."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"--from {keys.path}: {key}: expected a file or hub dataset id, got {value!r}"
        )
    local = keys.resolve(value, key)
    if local is not None:
        return str(local)
    looks_local = value.lower().endswith(DATA_SUFFIXES) or value.startswith(("/", ".", "~"))
    if looks_local or value.count("/") > 1:
        raise ConfigError(f"--from {keys.path}: {key}: dataset path {value} does not exist")
    return value


def lora_targets(value: Any, keys: Keys, key: str) -> list[str] | str | None:
    """Target modules as a list of names or 'all-linear' (PEFT's spelling)."""
    if value is None or (value == [] and keys.get("lora_target_parameters")):
        return None  # [] beside target parameters: those only, as rankwise reads no modules
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise keys.error(key, "module names (a list, or names joined by commas)")
    if value in (["all-linear"], ["all"]):
        return "all-linear"
    return value
