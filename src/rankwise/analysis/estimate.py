"""What each rank will cost, predicted before training anything.

For every candidate rank: the trainable parameters (exactly what PEFT's
``get_nb_trainable_parameters()`` reports), the size of the saved adapter file, and
the peak training memory, broken into

    baseline     the process before the model is loaded (CPU only: Python, torch, ...);
                 a search instead measures, right before each trial, what is resident
                 besides the weights (data, retain set, tokenizer: TrialRunner.predict;
                 on Ray the worker's own memory)
    weights      base parameters x dtype size (frozen; no gradients, no optimiser state);
                 with ``quantize`` the linear layers at 0.5 (4bit) or 1 (8bit) byte per
                 weight plus their quantisation state, the rest in fp32
                 (rankwise.io.quantize)
    adapter      LoRA parameters in fp32 x 4: the parameter, its gradient and AdamW's
                 exp_avg and exp_avg_sq (PEFT keeps adapters in fp32: autocast_adapter_dtype)
    activations  tensors autograd saves for backward for a B x L batch, plus the logits
                 and the cross-entropy's copies of them (B x L x V each)

A model given by name is built on the meta device from its config, so nothing is read
but ``config.json`` (or the GGUF header). An already-loaded model is inspected in place.
A classifier (``--task seq-cls``) also trains and saves its head (PEFT's
``modules_to_save``) and computes no vocabulary logits.
:func:`calibrate` times a few real steps at two ranks to turn trainable parameters into
seconds per step.

Example:
    >>> from rankwise.testing import tiny_model
    >>> rows = estimate(tiny_model("llama"), ranks=(4, 16), baseline_bytes=0)
    >>> rows[0].trainable_params, rows[1].trainable_params
    (2048, 8192)
    >>> [estimate(tiny_model("llama"), ranks=(4,), quantize=q, baseline_bytes=0)[0].weights_bytes
    ...  for q in ("none", "8bit", "4bit")]  # embeddings, head and norms stay in fp32
    [394496, 153344, 110064]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from rankwise.analysis.memory import _ADAM_COPIES, _Shape, activation_bytes, weights_bytes
from rankwise.analysis.params import (
    _ADAPTER_BYTES,
    _DTYPE_BYTES,
    _base_params,
    _parameter_targets,
    _peft_targets,
    adapter_file_bytes,
    lora_param_count,
    module_targets,
)
from rankwise.config import format_bytes
from rankwise.io.quantize import import_peft

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class RankEstimate:
    """The predicted cost of training one rank."""

    rank: int
    trainable_params: int
    """Exactly what PEFT's ``get_nb_trainable_parameters()[0]`` reports."""
    base_params: int
    """Parameters of the base model (tied weights counted once)."""
    adapter_bytes: int
    """Size of ``adapter_model.safetensors`` as PEFT saves it (fp32, header included)."""
    weights_bytes: int
    """Base parameters x dtype size."""
    adapter_state_bytes: int
    """Adapter parameters + gradients + AdamW exp_avg and exp_avg_sq, in fp32."""
    activation_bytes: int
    """Saved activations for the batch, plus logits and the loss's copies of them."""
    baseline_bytes: int
    """Memory in use besides the model: before it is loaded (CPU: process RSS; CUDA: 0),
    or, in a search, what is resident when the trial starts less the weights."""
    peak_memory_bytes: int
    """Sum of the above: the predicted peak of a training step."""
    step_seconds: float | None = None
    """Predicted seconds per optimiser step (from :func:`calibrate`)."""
    trial_seconds: float | None = None
    """step_seconds x max_steps."""

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a share of the base model's."""
        return self.trainable_params / self.base_params if self.base_params else 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StepTimeModel:
    """seconds per step = intercept + slope x trainable parameters, fitted on real steps."""

    intercept: float
    slope: float
    batch_size: int
    seq_len: int
    samples: tuple[tuple[int, float], ...]
    """(trainable_params, measured seconds per step) for each calibrated rank."""

    def seconds(self, trainable_params: int) -> float:
        # The floor keeps a noisy negative slope from predicting free steps.
        floor = 0.5 * min(s for _, s in self.samples)
        return max(self.intercept + self.slope * trainable_params, floor)

    def apply(
        self, estimates: list[RankEstimate], max_steps: int | None = None
    ) -> list[RankEstimate]:
        """Fill step_seconds (and trial_seconds when max_steps is given)."""
        out = []
        for e in estimates:
            step = self.seconds(e.trainable_params)
            trial = step * max_steps if max_steps else None
            out.append(dataclasses.replace(e, step_seconds=step, trial_seconds=trial))
        return out


def _meta_model(model: str, trust_remote_code: bool):
    """Build the model on the meta device from its config: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from rankwise.io.models import resolve_source

        source = resolve_source(model)
        path, gguf_file = source.path, source.gguf_file
    except ImportError:  # models.py not there yet: local directories only
        if not (Path(model) / "config.json").exists():
            raise ValueError(f"model: {model!r} is not a local model directory") from None
        path, gguf_file = model, None
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def estimate(
    model,
    ranks=DEFAULT_RANKS,
    target_modules=None,
    batch_size: int = 8,
    seq_len: int = 256,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    bias: str = "none",
    device: str = "cpu",
    trust_remote_code: bool = False,
    baseline_bytes: int | None = None,
    timing: StepTimeModel | None = None,
    max_steps: int | None = None,
    quantize: str = "none",
    target_parameters=None,
    use_dora: bool = False,
) -> list[RankEstimate]:
    """Predict trainable parameters, adapter size and peak training memory per rank.

    ``model`` is a name (hub id, local directory, .gguf, 'smollm2': only its config is
    read) or a loaded ``nn.Module`` (inspected in place, weights untouched). On CPU the
    baseline is this process's current RSS unless ``baseline_bytes`` is given: call it
    before loading the model, or pass the RSS measured then. ``timing`` (from
    :func:`calibrate`) fills step and trial seconds. ``target_parameters``: as PEFT takes
    them, or ``experts`` (rankwise.io.experts); the rank is then each expert's.
    ``use_dora``: DoRA adapters (their magnitude vectors and the outputs they scale).
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {', '.join(_DTYPE_BYTES)}, got {dtype!r}")
    if quantize not in ("none", "4bit", "8bit"):
        raise ValueError(f"quantize: expected none, 4bit or 8bit, got {quantize!r}")
    import_peft()  # the targets are PEFT's; imported without bitsandbytes (rankwise.io.quantize)
    if isinstance(model, (str, Path)):
        model = _meta_model(str(model), trust_remote_code)
    if baseline_bytes is None:
        from rankwise.training.resources import current_rss

        baseline_bytes = current_rss() if str(device) == "cpu" else 0
    tp = _resolve_parameters(model, target_parameters)
    targets = module_targets(model, target_modules, tp)
    shapes = _parameter_targets(model, tp)
    base = _base_params(model)
    weights = weights_bytes(model, dtype, quantize)
    rows = []
    for rank in sorted(ranks):
        trainable = lora_param_count(model, target_modules, rank, bias, tp, use_dora)
        state = _ADAM_COPIES * _ADAPTER_BYTES * trainable
        acts = activation_bytes(
            model, targets, rank, batch_size, seq_len, dtype, gradient_checkpointing, device,
            shapes, use_dora,
        )  # fmt: skip
        rows.append(
            RankEstimate(
                rank=rank,
                trainable_params=trainable,
                base_params=base,
                adapter_bytes=adapter_file_bytes(
                    model, target_modules, rank, bias, dtype, tp, use_dora
                ),
                weights_bytes=weights,
                adapter_state_bytes=state,
                activation_bytes=acts,
                baseline_bytes=int(baseline_bytes),
                peak_memory_bytes=int(baseline_bytes) + weights + state + acts,
            )
        )
    return timing.apply(rows, max_steps) if timing else rows


def _resolve_parameters(model, target_parameters):
    """``experts`` expanded and every name checked (rankwise.io.experts)."""
    from rankwise.io.experts import resolve_target_parameters

    return resolve_target_parameters(model, target_parameters)


def _time_steps(
    model, rank, target_modules, batch_size, seq_len, steps, seed, target_parameters=None,
    use_dora=False,
) -> tuple[int, float]:  # fmt: skip
    """Seconds per step of a fresh adapter, timed by the one trial lifecycle on random
    tokens (its first step is warm-up, not timed); the base model is left as it was."""
    import torch

    from rankwise.io.data import TokenData
    from rankwise.records import LoraSpec, TrainSpec, TrialKind, TrialSpec
    from rankwise.training.adapter import TrialContext
    from rankwise.training.trial import run_trial

    device = str(next(model.parameters()).device)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, _Shape.of(model).vocab, (batch_size, seq_len), generator=gen)
    ctx = TrialContext(model, None, device, TokenData(ids, ids, ids[:1], ids[:1], {}))
    tp = _resolve_parameters(model, target_parameters)
    targets = [] if tp and target_modules is None else _peft_targets(model, target_modules)
    spec = TrialSpec(
        key=f"calibrate-r{rank}",
        rank=rank,
        seed=seed,
        kind=TrialKind.CALIBRATION,
        lora=LoraSpec(
            r=rank, lora_alpha=16, target_modules=targets, target_parameters=tp, use_dora=use_dora
        ),
        train=TrainSpec(
            max_steps=steps + 1, batch_size=batch_size, lr=1e-4, warmup_steps=0, seed=seed
        ),
        model={},
        data_dir="",
    )
    result = run_trial(spec, ctx)
    if result.step_seconds is None:
        raise ValueError(f"--calibrate: timing steps at r={rank} failed ({result.reason})")
    return result.trainable_params, result.step_seconds


def calibrate(
    model,
    ranks=(1, 64),
    *,
    target_modules=None,
    batch_size: int = 8,
    seq_len: int = 256,
    steps: int = 3,
    seed: int = 0,
    target_parameters=None,
    use_dora: bool = False,
) -> StepTimeModel:
    """Time real training steps at two ranks and fit seconds = a + b x trainable params.

    Each rank gets a fresh adapter (AdamW, forward + backward on random tokens) that is
    unloaded afterwards, so ``model`` is unchanged. Pass the result to :func:`estimate`
    (``timing=``) or use :meth:`StepTimeModel.apply`.
    """
    if len(set(ranks)) < 2:
        raise ValueError(f"ranks: need two different ranks to fit a line, got {ranks!r}")
    tp = target_parameters
    samples = tuple(
        _time_steps(model, r, target_modules, batch_size, seq_len, steps, seed, tp, use_dora)
        for r in sorted(set(ranks))
    )
    (p0, t0), (p1, t1) = samples[0], samples[-1]
    slope = (t1 - t0) / (p1 - p0) if p1 != p0 else 0.0
    return StepTimeModel(t0 - slope * p0, slope, batch_size, seq_len, samples)


def format_table(estimates: list[RankEstimate]) -> str:
    """A fixed-width table of the estimates (times only when calibrated)."""
    timed = any(e.step_seconds is not None for e in estimates)
    head = [
        "rank",
        "trainable",
        "% base",
        "adapter",
        "weights",
        "adapter+grad+Adam",
        "activations",
        "peak",
    ] + (["s/step", "trial"] if timed else [])
    rows = [head]
    for e in estimates:
        row = [
            str(e.rank),
            f"{e.trainable_params:,}",
            f"{100 * e.trainable_share:.3f}%",
            format_bytes(e.adapter_bytes),
            format_bytes(e.weights_bytes),
            format_bytes(e.adapter_state_bytes),
            format_bytes(e.activation_bytes),
            format_bytes(e.peak_memory_bytes),
        ]
        if timed:
            row += [_secs(e.step_seconds), _secs(e.trial_seconds)]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if estimates and estimates[0].baseline_bytes:
        lines.append(
            f"peak includes a runtime baseline of {format_bytes(estimates[0].baseline_bytes)}"
        )
    return "\n".join(lines)


def _secs(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f}s" if s < 120 else f"{s / 60:.1f}m"
