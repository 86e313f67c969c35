"""The factors of an adapter's fused expert parameters, split per expert.

PEFT's ``ParamWrapper`` (``target_parameters``) gives each of a parameter's E experts rank
r in one pair of factors: ``lora_A`` of shape (r·E, in) holds expert e's rows at
``A.reshape(E, r, in)[e]`` and ``lora_B`` (out, r·E) its columns at
``B.reshape(out, r, E)[:, :, e]``, so expert e's update is ``scaling · B_e @ A_e``
(peft ``tuners/lora/layer.py``, ``ParamWrapper.get_delta_weight``).

The file names a wrapper by its module only. Two parameters of one module (Qwen3-MoE's
``experts.gate_up_proj`` and ``experts.down_proj``) nest, the first registered innermost:
``<module>.base_layer.lora_A.weight`` and ``<module>.lora_A.weight``. Which saved name is
which parameter follows from the order the base model registers them in, read from its
structure (built on the meta device from ``base_model_name_or_path``'s config, offline);
the config's ``target_parameters`` cannot tell (PEFT keeps them as a set). Where the base
cannot be read, transformers' convention stands in: gate and up before down.

Example (two experts of rank 1, and the saved paths of two nested wrappers):
    >>> import torch
    >>> a, b = torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.tensor([[1.0, 5.0], [0.0, 0.0]])
    >>> [tuple(f.shape) for f in split_experts(a, b, experts=2)[0]]
    [(1, 2), (2, 1)]
    >>> wrapped_parameters({"target_parameters": ["experts.down", "experts.up"]},
    ...                    ["m.experts.base_layer", "m.experts", "m.q_proj"],
    ...                    registered={"m.experts": ["up", "down"]})
    {'m.experts.base_layer': 'm.experts.up', 'm.experts': 'm.experts.down'}
"""

from __future__ import annotations

from typing import Any

from rankwise.errors import ConfigError

__all__ = ["wrapped_parameters", "registration_order", "split_experts", "experts_of"]

_NESTED = ".base_layer"


def _unwrapped(name: str) -> tuple[str, int]:
    """A saved module path without its ``.base_layer`` parts, and how many there were."""
    depth = 0
    while name.endswith(_NESTED):
        name, depth = name[: -len(_NESTED)], depth + 1
    return name, depth


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def wrapped_parameters(
    config: dict[str, Any], names: list[str], registered: dict[str, list[str]] | None = None
) -> dict[str, str]:
    """Saved module path -> full name of the parameter its ParamWrapper adapts, for the
    paths of ``names`` that are ParamWrappers under the config's ``target_parameters``.

    ``registered``: module name -> its parameters' names in registration order (default:
    :func:`registration_order` of the adapter's base model)."""
    targets = config.get("target_parameters") or []
    if not targets:
        return {}
    modules: dict[str, list[tuple[int, str]]] = {}
    for name in names:
        module, depth = _unwrapped(name)
        modules.setdefault(module, []).append((depth, name))
    nested = any(len(saved) > 1 for saved in modules.values())
    if registered is None and nested:
        registered = registration_order(config.get("base_model_name_or_path"))
    out = {}
    for module, saved in modules.items():
        candidates = ((f"{module}.{t.rpartition('.')[2]}", t) for t in targets)
        params = sorted({p for p, t in candidates if _matches(p, t)})
        if len(params) != len(saved):
            continue  # not a ParamWrapper (a module targeted by target_modules)
        params = _in_order(module, params, (registered or {}).get(module))
        for depth, name in saved:  # depth 0 is the outermost: the last registered
            out[name] = params[len(params) - 1 - depth]
    return out


def _in_order(module: str, params: list[str], registered: list[str] | None) -> list[str]:
    """``params`` in the order their module registers them (PEFT wraps them in that order)."""
    short = [p.rpartition(".")[2] for p in params]
    if registered and set(short) <= set(registered):
        return [f"{module}.{p}" for p in sorted(short, key=registered.index)]

    def convention(p: str) -> tuple[int, str]:  # transformers: gate_up_proj, then down_proj
        return (0 if "gate" in p or "up" in p else 2 if "down" in p else 1, p)

    return [f"{module}.{p}" for p in sorted(short, key=convention)]


def registration_order(base: str | None) -> dict[str, list[str]] | None:
    """Module name -> its parameters' names, in order, for the modules of ``base`` that hold
    a 3-D parameter; built on the meta device from the config alone, offline (no download,
    no remote code). None where the config cannot be read."""
    if not base:
        return None
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # not local, not a causal LM transformers knows: fall back
        return None
    return {
        name: [n for n, _ in module.named_parameters(recurse=False)]
        for name, module in model.named_modules()
        if any(p.ndim == 3 for p in module.parameters(recurse=False))
    }


def experts_of(lora_A, rank: int, name: str) -> int:
    """E, from ``lora_A``'s r·E rows and the parameter's rank ``r``."""
    rows = lora_A.shape[0]
    if rank <= 0 or rows % rank:
        raise ConfigError(f"{name}: lora_A has {rows} rows, not a multiple of its rank {rank}")
    return rows // rank


def split_experts(lora_A, lora_B, experts: int) -> list[tuple[Any, Any]]:
    """Each expert's (A_e of shape (r, in), B_e of shape (out, r)), in expert order."""
    a = lora_A.reshape(experts, -1, lora_A.shape[-1])
    b = lora_B.reshape(lora_B.shape[0], -1, experts)
    return [(a[e], b[:, :, e]) for e in range(experts)]
