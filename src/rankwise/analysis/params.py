"""Exact counts before training: the LoRA parameters PEFT will create, and the adapter file's size."""

from __future__ import annotations

import json
import math

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


_ADAPTER_BYTES = (
    4  # PEFT upcasts adapter weights to fp32 (get_peft_model autocast_adapter_dtype=True)
)


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


def module_targets(model, target_modules=None, target_parameters=None) -> list[str]:
    """:func:`resolve_target_modules`, except that target parameters alone wrap no module
    (rankwise passes ``target_modules=[]`` then: rankwise.io.models.check_targets)."""
    if target_parameters and target_modules in (None, []):
        return []
    return resolve_target_modules(model, target_modules)


def _parameter_targets(model, target_parameters) -> dict:
    """Full name -> :class:`~rankwise.io.experts.ParameterShape` of each wrapped parameter."""
    from rankwise.io.experts import targeted_parameters

    return targeted_parameters(model, target_parameters)


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


def lora_param_count(
    model,
    target_modules=None,
    rank: int = 8,
    bias: str = "none",
    target_parameters=None,
    use_dora: bool = False,
) -> int:
    """Trainable parameters of a LoRA adapter, exactly as PEFT counts them: with target
    parameters, r·E·(in + out) for each (E experts of rank r each); with DoRA, also one
    magnitude per output feature of every adapted module."""
    targets = module_targets(model, target_modules, target_parameters)
    lora = sum(rank * sum(_linear_shape(m)) for _, m in _modules(model, targets))
    if use_dora:
        lora += sum(_linear_shape(m)[1] for _, m in _modules(model, targets))
    lora += sum(p.params(rank) for p in _parameter_targets(model, target_parameters).values())
    head = sum(n for _, n in _head_params(model).values())
    return lora + sum(_bias_params(model, targets, bias).values()) + head


_SAFETENSORS_TAG = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2)}


def _parameter_tensors(model, target_parameters, rank) -> list[tuple]:
    """The saved rows of the wrapped parameters. PEFT nests one ParamWrapper per parameter
    of a module, the first registered innermost, and saves each under its wrapper's path:
    ``<module>.base_layer.lora_A.weight`` for the inner of two, ``<module>.lora_A.weight``
    for the outer."""
    shapes = _parameter_targets(model, target_parameters)
    per_module: dict[str, list[str]] = {}
    for name in shapes:
        per_module.setdefault(name.rpartition(".")[0], []).append(name)
    rows = []
    for module, names in per_module.items():
        for depth, name in enumerate(reversed(names)):
            p = shapes[name]
            prefix = f"base_model.model.{module}" + ".base_layer" * depth
            rows.append((f"{prefix}.lora_A.weight", [rank * p.experts, p.fan_in], "F32", 4))
            rows.append((f"{prefix}.lora_B.weight", [p.fan_out, rank * p.experts], "F32", 4))
    return rows


def _lora_tensors(model, targets, rank, bias, bias_dtype, target_parameters=None, dora=False):
    """(saved name, shape, dtype tag, element size) of every tensor in the adapter file
    (DoRA: each module's ``lora_magnitude_vector`` too, one value per output feature)."""
    import torch

    rows = _parameter_tensors(model, target_parameters, rank)
    for name, module in _modules(model, targets):
        fan_in, fan_out = _linear_shape(module)
        prefix = f"base_model.model.{name}"
        if isinstance(module, torch.nn.Embedding):
            pairs = (("lora_embedding_A", [rank, fan_in]), ("lora_embedding_B", [fan_out, rank]))
        else:
            pairs = (("lora_A.weight", [rank, fan_in]), ("lora_B.weight", [fan_out, rank]))
        if dora:
            pairs += (("lora_magnitude_vector", [fan_out]),)
        for suffix, shape in pairs:
            rows.append((f"{prefix}.{suffix}", shape, "F32", 4))
    tag, size = _SAFETENSORS_TAG[bias_dtype]
    for name, numel in _bias_params(model, targets, bias).items():
        rows.append((f"base_model.model.{name}", [numel], tag, size))
    for name, (shape, _) in _head_params(model).items():  # the trained copy, in fp32
        rows.append((f"base_model.model.{name}", shape, "F32", 4))
    return rows


def adapter_file_bytes(
    model,
    target_modules=None,
    rank: int = 8,
    bias: str = "none",
    dtype: str = "float32",
    target_parameters=None,
    use_dora: bool = False,
) -> int:
    """Size of the ``adapter_model.safetensors`` PEFT writes, header included.

    safetensors layout: 8-byte header length, a compact JSON header (tensors sorted by
    name within dtype, widest dtype first, ``__metadata__`` first) padded with spaces to
    a multiple of 8, then the data. Biases (bias="all"/"lora_only") keep the base dtype.
    """
    targets = module_targets(model, target_modules, target_parameters)
    rows = _lora_tensors(model, targets, rank, bias, dtype, target_parameters, use_dora)
    rows.sort(key=lambda t: (-t[3], t[0]))
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, tag, size in rows:
        nbytes = size * math.prod(shape)
        header[name] = {"dtype": tag, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + math.ceil(text / 8) * 8 + offset


def _base_params(model) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    from rankwise.io.models import param_count

    if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
        raise ValueError("model: already carries a PEFT adapter; pass the base model")
    return param_count(model)  # parameters() skips tied duplicates; 4-bit unpacked
