"""What each rank will cost, predicted before training anything.

For every candidate rank: the trainable parameters (exactly what PEFT's
``get_nb_trainable_parameters()`` reports), the size of the saved adapter file, and
the peak training memory, broken into

    baseline     the process before the model is loaded (CPU only: Python, torch, ...)
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
import json
import math
from dataclasses import dataclass
from pathlib import Path

from rankwise.config import format_bytes

__all__ = [
    "RankEstimate",
    "StepTimeModel",
    "estimate",
    "calibrate",
    "format_table",
    "lora_param_count",
    "resolve_target_modules",
    "adapter_file_bytes",
    "activation_bytes",
    "weights_bytes",
    "DEFAULT_RANKS",
]

DEFAULT_RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_ADAPTER_BYTES = (
    4  # PEFT upcasts adapter weights to fp32 (get_peft_model autocast_adapter_dtype=True)
)
_ADAM_COPIES = 4  # parameter + gradient + exp_avg + exp_avg_sq

# The layer formula counts exactly the bytes autograd saves (checked with
# saved_tensors_hooks, bench/memory.py --saved). On CPU the peak RSS is 2-3x that:
# per-layer tensors (~0.5-8 MiB) sit under glibc's dynamic mmap threshold (max 32 MiB),
# so they live on the heap, and the holes left by freed forward temporaries and
# backward gradients stay resident (with MALLOC_MMAP_THRESHOLD_=65536 the excess
# vanishes). The factor is fitted on bench/memory.py (bench/RESULTS.md). On CUDA,
# max_memory_allocated counts live tensors only: the saved bytes plus a layer's
# transient gradients.
CPU_HEAP_FACTOR = 2.5
_MMAP_THRESHOLD_MAX = (
    32 * 2**20
)  # glibc DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: always mmapped, freed at once
CUDA_TRANSIENT_FACTOR = 1.1
LOGIT_COPIES = 3  # at the start of backward: log_softmax output, its gradient, grad of logits


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
    """Memory in use before the model is loaded (CPU: process RSS; CUDA: 0)."""
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


# --------------------------------------------------------------------------- targets


def _linear_shape(module) -> tuple[int, int] | None:
    """(in, out) of a module LoRA can wrap as a matrix; None for other modules."""
    import torch
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):  # GPT-2: weight is (in, out), PEFT sets fan_in_fan_out
        return module.weight.shape[0], module.weight.shape[1]
    if isinstance(module, torch.nn.Embedding):  # lora_embedding_A: (r, num), _B: (dim, r)
        return module.num_embeddings, module.embedding_dim
    return None


def _peft_targets(model, target_modules):
    """target_modules as PEFT's LoraConfig takes it (None -> the architecture default)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in MAP:
            raise ValueError(
                f"target_modules: PEFT has no default for model type {model_type!r}; "
                "pass names or 'all-linear'"
            )
        return list(MAP[model_type])
    if isinstance(target_modules, str):
        return target_modules
    targets = list(target_modules)
    if len(targets) == 1 and targets[0].lower() == "all-linear":
        return "all-linear"
    return targets


def resolve_target_modules(model, target_modules=None) -> list[str]:
    """Full names of the modules PEFT would wrap with LoRA, in model order.

    Uses PEFT's own matching (``check_target_module_exists`` and the ``all-linear``
    expansion: every Linear/Conv1D except the output head).
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import (
        _maybe_include_all_linear_layers,
        check_target_module_exists,
    )

    task = "SEQ_CLS" if _classifier_head(model) is not None else None
    config = LoraConfig(r=1, target_modules=_peft_targets(model, target_modules), task_type=task)
    config = _maybe_include_all_linear_layers(config, model)
    names = [
        name
        for name, module in model.named_modules()
        if name and check_target_module_exists(config, name) and _linear_shape(module)
    ]
    if not names:
        raise ValueError(f"target_modules: {target_modules!r} matches no module of the model")
    return names


def _modules(model, names):
    lookup = dict(model.named_modules())
    return [(n, lookup[n]) for n in names]


def _bias_params(model, targets: list[str], bias: str) -> dict[str, int]:
    """Bias parameters PEFT makes trainable: name in the saved adapter -> numel."""
    if bias not in ("none", "all", "lora_only"):
        raise ValueError(f"bias: expected none, all or lora_only, got {bias!r}")
    if bias == "none":
        return {}
    wrapped = set(targets)
    out = {}
    for name, param in model.named_parameters():  # deduplicated, like PEFT's count
        if not (name == "bias" or name.endswith(".bias")):
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if bias == "lora_only" and owner not in wrapped:
            continue
        saved = f"{owner}.base_layer.bias" if owner in wrapped else name
        out[saved] = param.numel()
    return out


def _classifier_head(model):
    """(name, module) of a sequence classifier's head, which PEFT trains and saves beside the
    adapter (SEQ_CLS ``modules_to_save``); None for a model with an LM head."""
    import torch
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is not None:
        return None
    for name in SEQ_CLS_HEAD_NAMES:
        if isinstance(getattr(model, name, None), torch.nn.Module):
            return name, getattr(model, name)
    return None


def _head_params(model) -> dict[str, tuple[list[int], int]]:
    """The classifier head's tensors as saved: name -> (shape, numel)."""
    head = _classifier_head(model)
    if head is None:
        return {}
    name, module = head
    return {f"{name}.{k}": (list(p.shape), p.numel()) for k, p in module.named_parameters()}


def lora_param_count(model, target_modules=None, rank: int = 8, bias: str = "none") -> int:
    """Trainable parameters of a LoRA adapter, exactly as PEFT counts them."""
    targets = resolve_target_modules(model, target_modules)
    lora = sum(rank * sum(_linear_shape(m)) for _, m in _modules(model, targets))
    head = sum(n for _, n in _head_params(model).values())
    return lora + sum(_bias_params(model, targets, bias).values()) + head


_SAFETENSORS_TAG = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _lora_tensors(model, targets, rank, bias, bias_dtype):
    """(saved name, shape, dtype tag, element size) of every tensor in the adapter file."""
    import torch

    rows = []
    for name, module in _modules(model, targets):
        fan_in, fan_out = _linear_shape(module)
        prefix = f"base_model.model.{name}"
        if isinstance(module, torch.nn.Embedding):
            pairs = (("lora_embedding_A", [rank, fan_in]), ("lora_embedding_B", [fan_out, rank]))
        else:
            pairs = (("lora_A.weight", [rank, fan_in]), ("lora_B.weight", [fan_out, rank]))
        for suffix, shape in pairs:
            rows.append((f"{prefix}.{suffix}", shape, "F32", 4))
    tag, size = _SAFETENSORS_TAG[bias_dtype]
    for name, numel in _bias_params(model, targets, bias).items():
        rows.append((f"base_model.model.{name}", [numel], tag, size))
    for name, (shape, _) in _head_params(model).items():  # the trained copy, in fp32
        rows.append((f"base_model.model.{name}", shape, "F32", 4))
    return rows


def adapter_file_bytes(
    model, target_modules=None, rank: int = 8, bias: str = "none", dtype: str = "float32"
) -> int:
    """Size of the ``adapter_model.safetensors`` PEFT writes, header included.

    safetensors layout: 8-byte header length, a compact JSON header (tensors sorted by
    name within dtype, widest dtype first, ``__metadata__`` first) padded with spaces to
    a multiple of 8, then the data. Biases (bias="all"/"lora_only") keep the base dtype.
    """
    targets = resolve_target_modules(model, target_modules)
    rows = sorted(_lora_tensors(model, targets, rank, bias, dtype), key=lambda t: (-t[3], t[0]))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, tag, size in rows:
        nbytes = size * math.prod(shape)
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + math.ceil(text / 8) * 8 + offset


# ----------------------------------------------------------------------- activations


@dataclass(frozen=True)
class _Shape:
    """The numbers the activation formula needs, read from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_hidden: int
    vocab: int
    gpt2: bool
    attn_dropout: float
    resid_dropout: float

    @classmethod
    def of(cls, model) -> _Shape:
        c = model.config
        c = c.get_text_config() if hasattr(c, "get_text_config") else c
        h, heads = c.hidden_size, c.num_attention_heads
        gpt2 = c.model_type == "gpt2"
        inter = (getattr(c, "n_inner", None) or 4 * h) if gpt2 else c.intermediate_size
        head_dim = getattr(c, "head_dim", None) or h // heads
        kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
        drop = getattr(c, "attn_pdrop", None) if gpt2 else getattr(c, "attention_dropout", 0.0)
        return cls(
            h,
            inter,
            c.num_hidden_layers,
            heads,
            kv,
            c.vocab_size,
            gpt2,
            float(drop or 0.0),
            float(getattr(c, "resid_pdrop", 0.0) or 0.0),
        )


def _base_layer_elements(s: _Shape, seq_len: int) -> tuple[float, float]:
    """Elements per token one decoder layer saves for backward, without LoRA's extras,
    as (hidden-width tensors, L x L attention tensors).

    Frozen matmuls save only their weight (no input), so what remains are the tensors
    the non-linear ops keep. Derived op by op and checked with saved_tensors_hooks
    (bench/memory.py --saved) on the tiny models:
      Llama: norm input x, h1 (2h); rotated q, k and v, SDPA output (h + 2kv);
             SiLU input, SiLU output and up (3I). CPU flash attention keeps no L x L.
      GPT-2: ln inputs (2h), qkv (3h), dropout masks (2h, float), NewGELU's pow/tanh/
             1+tanh/0.5x (4I); with attention dropout SDPA takes the math path and
             keeps softmax, dropout mask and dropped probabilities (3 x heads x L).
    """
    h, inter, kv = s.hidden, s.intermediate, s.kv_hidden
    if s.gpt2:
        masks = 2 * h if s.resid_dropout > 0 else 0
        if s.attn_dropout > 0:
            return 5 * h + masks + 4 * inter, 3 * s.heads * seq_len
        return 6 * h + masks + 4 * inter, 0.0
    return 3 * h + 2 * kv + h + 3 * inter, 0.0


# Inputs of these modules are already kept by the base layer (the SDPA output), so LoRA
# adds nothing for them; every other target keeps its input once per distinct input.
_SHARED_INPUTS = {"o_proj"}


def _lora_layer_elements(model, targets: list[str], rank: int) -> float:
    """Elements per token (summed over layers) that LoRA adds: inputs to lora_A, A's outputs."""
    inputs: dict[tuple[str, int], int] = {}
    for name, module in _modules(model, targets):
        parent, _, short = name.rpartition(".")
        fan_in, _ = _linear_shape(module)
        if short not in _SHARED_INPUTS:
            # q/k/v read the same normed input, as do gate/up: one copy per (parent, width)
            inputs[(parent, fan_in)] = fan_in
    return sum(inputs.values()) + rank * len(targets)


def activation_bytes(
    model,
    targets: list[str],
    rank: int,
    batch_size: int,
    seq_len: int,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    device: str = "cpu",
) -> int:
    """Peak bytes of activations for one training step of a B x L batch.

    Saved tensors of every layer (or, with gradient checkpointing, each layer's input
    plus one layer recomputed during backward) and the logits: at the start of backward
    the log-softmax output, its gradient and the logits' gradient coexist, B x L x V
    each, in fp32 (transformers' loss upcasts the logits; a lower-precision model also
    holds its own copy).
    """
    s = _Shape.of(model)
    size = _DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    per_layer, attention = _base_layer_elements(s, seq_len)
    lora = _lora_layer_elements(model, targets, rank)
    if gradient_checkpointing:
        layers = s.layers * s.hidden + per_layer + lora / s.layers
    else:
        layers, attention = s.layers * per_layer + lora, s.layers * attention
    logits = LOGIT_COPIES * 4 + (size if size != 4 else 0)
    if _classifier_head(model) is not None:
        logits = 0  # a classifier's logits are B x num_labels, not B x L x V
    hidden_scale = _scale(device, tokens * s.hidden * size)
    attention_scale = _scale(device, batch_size * s.heads * seq_len**2 * size)
    return int(
        tokens * size * (hidden_scale * layers + attention_scale * attention)
        + tokens * s.vocab * logits
    )


def _scale(device: str, tensor_bytes: int) -> float:
    """Measured peak / saved bytes for tensors of this size (see CPU_HEAP_FACTOR)."""
    if str(device) != "cpu":
        return CUDA_TRANSIENT_FACTOR
    return CPU_HEAP_FACTOR if tensor_bytes < _MMAP_THRESHOLD_MAX else 1.0


# ------------------------------------------------------------------------- estimate


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


def _base_params(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from rankwise.io.models import param_count

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("model: already carries a PEFT adapter; pass the base model")
    return param_count(model)  # parameters() skips tied duplicates; 4-bit unpacked


def weights_bytes(model, dtype: str = "float32", quantize: str = "none") -> int:
    """Bytes of the frozen base weights in memory.

    Unquantized: every parameter at the dtype's size. Quantized: every linear layer but the
    output head (transformers keeps the LM head, and rankwise a classifier's head, in
    full precision) at its 4-/8-bit size with its quantisation state, and every other
    parameter in fp32 (``prepare_model_for_kbit_training`` upcasts fp16/bf16 ones).
    """
    import torch

    from rankwise.io.models import output_head_name
    from rankwise.io.quantize import linear_weight_bytes

    if quantize == "none":
        return _base_params(model) * _DTYPE_BYTES[dtype]
    head = output_head_name(model)
    quantized, covered = 0, set()
    for name, module in model.named_modules():
        if name != head and isinstance(module, torch.nn.Linear):  # bnb's layers subclass it
            quantized += linear_weight_bytes(module.in_features, module.out_features, quantize)
            covered.add(id(module.weight))
    rest = sum(p.numel() for p in model.parameters() if id(p) not in covered)
    return quantized + 4 * rest


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
) -> list[RankEstimate]:
    """Predict trainable parameters, adapter size and peak training memory per rank.

    ``model`` is a name (hub id, local directory, .gguf, 'smollm2': only its config is
    read) or a loaded ``nn.Module`` (inspected in place, weights untouched). On CPU the
    baseline is this process's current RSS unless ``baseline_bytes`` is given: call it
    before loading the model, or pass the RSS measured then. ``timing`` (from
    :func:`calibrate`) fills step and trial seconds.
    """
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype: expected one of {', '.join(_DTYPE_BYTES)}, got {dtype!r}")
    if quantize not in ("none", "4bit", "8bit"):
        raise ValueError(f"quantize: expected none, 4bit or 8bit, got {quantize!r}")
    if isinstance(model, (str, Path)):
        model = _meta_model(str(model), trust_remote_code)
    if baseline_bytes is None:
        from rankwise.training.resources import current_rss

        baseline_bytes = current_rss() if str(device) == "cpu" else 0
    targets = resolve_target_modules(model, target_modules)
    base = _base_params(model)
    weights = weights_bytes(model, dtype, quantize)
    rows = []
    for rank in sorted(ranks):
        trainable = lora_param_count(model, target_modules, rank, bias)
        state = _ADAM_COPIES * _ADAPTER_BYTES * trainable
        acts = activation_bytes(
            model, targets, rank, batch_size, seq_len, dtype, gradient_checkpointing, device
        )
        rows.append(
            RankEstimate(
                rank=rank,
                trainable_params=trainable,
                base_params=base,
                adapter_bytes=adapter_file_bytes(model, target_modules, rank, bias, dtype),
                weights_bytes=weights,
                adapter_state_bytes=state,
                activation_bytes=acts,
                baseline_bytes=int(baseline_bytes),
                peak_memory_bytes=int(baseline_bytes) + weights + state + acts,
            )
        )
    return timing.apply(rows, max_steps) if timing else rows


# ------------------------------------------------------------------------ calibrate


def _time_steps(model, rank, target_modules, batch_size, seq_len, steps, seed) -> tuple[int, float]:
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
    targets = _peft_targets(model, target_modules)
    spec = TrialSpec(
        key=f"calibrate-r{rank}",
        rank=rank,
        seed=seed,
        kind=TrialKind.CALIBRATION,
        lora=LoraSpec(r=rank, lora_alpha=16, target_modules=targets),
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
) -> StepTimeModel:
    """Time real training steps at two ranks and fit seconds = a + b x trainable params.

    Each rank gets a fresh adapter (AdamW, forward + backward on random tokens) that is
    unloaded afterwards, so ``model`` is unchanged. Pass the result to :func:`estimate`
    (``timing=``) or use :meth:`StepTimeModel.apply`.
    """
    if len(set(ranks)) < 2:
        raise ValueError(f"ranks: need two different ranks to fit a line, got {ranks!r}")
    samples = tuple(
        _time_steps(model, r, target_modules, batch_size, seq_len, steps, seed)
        for r in sorted(set(ranks))
    )
    (p0, t0), (p1, t1) = samples[0], samples[-1]
    slope = (t1 - t0) / (p1 - p0) if p1 != p0 else 0.0
    return StepTimeModel(t0 - slope * p0, slope, batch_size, seq_len, samples)


# --------------------------------------------------------------------------- report


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
