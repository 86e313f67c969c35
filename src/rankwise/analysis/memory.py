"""The memory model of a training step: weights, optimizer state, activations, and the allocator's overhead."""

from __future__ import annotations

from dataclasses import dataclass

from rankwise.analysis.params import (
    _DTYPE_BYTES,
    _base_params,
    _classifier_head,
    _linear_shape,
    _modules,
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


def _lora_layer_elements(model, targets: list[str], rank: int, dora: bool = False) -> float:
    """Elements per token (summed over layers) that LoRA adds: inputs to lora_A, A's outputs.

    DoRA (PEFT's DoraLinearLayer) also keeps, per adapted module, the base output and the
    LoRA output (2 x out per token) to scale them by magnitude / ||W + s·B@A||; its norm is
    detached, so the dense B@A it builds is freed within the forward. Measured with
    saved_tensors_hooks on the tiny Llama: exactly 2 x out per token, plus ~2.5 x out
    elements per module whatever the batch (left out)."""
    inputs: dict[tuple[str, int], int] = {}
    for name, module in _modules(model, targets):
        parent, _, short = name.rpartition(".")
        fan_in, _ = _linear_shape(module)
        if short not in _SHARED_INPUTS:
            # q/k/v read the same normed input, as do gate/up: one copy per (parent, width)
            inputs[(parent, fan_in)] = fan_in
    extra = sum(2 * _linear_shape(m)[1] for _, m in _modules(model, targets)) if dora else 0
    return sum(inputs.values()) + rank * len(targets) + extra


def _expert_elements(model, parameters: dict) -> tuple[float, int]:
    """What LoRA on parameters (PEFT's ParamWrapper) adds: (elements per token, elements).

    PEFT adds ``scaling · B_e @ A_e`` to the weight before the forward, so each wrapped
    parameter's merged copy (E x out x in) is kept for backward, and, the weight now
    needing a gradient, so is every expert's input: each token reaches
    ``num_experts_per_tok`` experts. The factors themselves are parameters. Measured with
    saved_tensors_hooks on the tiny Qwen3-MoE: exactly this, at every rank.
    """
    c = model.config
    c = c.get_text_config() if hasattr(c, "get_text_config") else c
    top_k = getattr(c, "num_experts_per_tok", None) or 1
    per_token = sum(top_k * p.fan_in if p.experts > 1 else p.fan_in for p in parameters.values())
    merged = sum(p.experts * p.fan_in * p.fan_out for p in parameters.values())
    return per_token, merged


def activation_bytes(
    model,
    targets: list[str],
    rank: int,
    batch_size: int,
    seq_len: int,
    dtype: str = "float32",
    gradient_checkpointing: bool = False,
    device: str = "cpu",
    parameters: dict | None = None,
    use_dora: bool = False,
) -> int:
    """Peak bytes of activations for one training step of a B x L batch.

    Saved tensors of every layer (or, with gradient checkpointing, each layer's input
    plus one layer recomputed during backward) and the logits: at the start of backward
    the log-softmax output, its gradient and the logits' gradient coexist, B x L x V
    each, in fp32 (transformers' loss upcasts the logits; a lower-precision model also
    holds its own copy). ``parameters``: the wrapped parameters' shapes
    (rankwise.io.experts.targeted_parameters), whose merged copies are kept too.
    """
    s = _Shape.of(model)
    size = _DTYPE_BYTES[dtype]
    tokens = batch_size * seq_len
    per_layer, attention = _base_layer_elements(s, seq_len)
    expert_inputs, merged = _expert_elements(model, parameters or {})
    lora = _lora_layer_elements(model, targets, rank, use_dora) + expert_inputs
    if gradient_checkpointing:  # one layer is recomputed, with its merged weights
        layers = s.layers * s.hidden + per_layer + lora / s.layers
        merged /= s.layers
    else:
        layers, attention = s.layers * per_layer + lora, s.layers * attention
    logits = LOGIT_COPIES * 4 + (size if size != 4 else 0)
    if _classifier_head(model) is not None:
        logits = 0  # a classifier's logits are B x num_labels, not B x L x V
    hidden_scale = _scale(device, tokens * s.hidden * size)
    attention_scale = _scale(device, batch_size * s.heads * seq_len**2 * size)
    merged_scale = _scale(device, int(merged * size / max(1, len(parameters or ()))))
    return int(
        tokens * size * (hidden_scale * layers + attention_scale * attention)
        + tokens * s.vocab * logits
        + merged_scale * merged * size
    )


def _scale(device: str, tensor_bytes: int) -> float:
    """Measured peak / saved bytes for tensors of this size (see CPU_HEAP_FACTOR)."""
    if str(device) != "cpu":
        return CUDA_TRANSIENT_FACTOR
    return CPU_HEAP_FACTOR if tensor_bytes < _MMAP_THRESHOLD_MAX else 1.0


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
