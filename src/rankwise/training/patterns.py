r"""``rank_pattern`` and ``alpha_pattern``: which key applies to a module, and whether PEFT obeyed.

PEFT matches a pattern key against a module's name in the base model as the regex
``(.*\.)?(key)$``: a full name (``model.layers.0.self_attn.q_proj``), a suffix
(``q_proj``) or a regex (``layers\.1\..*_proj``). A key that matches nothing is ignored
with only a warning (peft#3582), so a pattern must be read back after ``get_peft_model``:
:func:`verify_ranks` does that.

Example:
    >>> from peft import LoraConfig, get_peft_model
    >>> from rankwise.testing import tiny_model
    >>> config = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"layers.1.q_proj": 2})
    >>> verify_ranks(get_peft_model(tiny_model("llama"), config), config)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    rankwise.errors.ConfigError: rank_pattern key 'layers.1.q_proj' matched no LoRA module ...
    >>> config = LoraConfig(r=4, target_modules=["q_proj"], rank_pattern={"1.self_attn.q_proj": 2})
    >>> verify_ranks(get_peft_model(tiny_model("llama"), config), config)
    {'model.layers.0.self_attn.q_proj': 4, 'model.layers.1.self_attn.q_proj': 2}
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

from rankwise.errors import ConfigError
from rankwise.records import LoraSpec

__all__ = ["pattern_key", "pattern_value", "verify_ranks"]


def pattern_key(pattern: dict[str, Any], name: str) -> str | None:
    """The key of ``pattern`` that applies to module ``name``, matched as PEFT matches it."""
    if not pattern:
        return None
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(pattern.keys(), name)  # returns ``name`` itself when none matches
    return key if key in pattern else None


def pattern_value(pattern: dict[str, Any], name: str, default: Any) -> Any:
    """``pattern``'s value for module ``name``, or ``default`` when no key matches it."""
    key = pattern_key(pattern, name)
    return default if key is None else pattern[key]


def verify_ranks(peft_model, lora_config, adapter_name: str = "default") -> dict[str, int]:
    """Check that PEFT gave every LoRA module the rank and alpha its config asks; ranks by name.

    Raises :class:`ConfigError` naming the key when a ``rank_pattern`` or ``alpha_pattern``
    key matched no LoRA module (PEFT only warns: peft#3582), or naming the module when its
    rank (rows of ``lora_A``, as built) or alpha differs from what the pattern asks.
    """
    built = _lora_modules(peft_model, adapter_name)
    if not built:
        raise ConfigError(f"no LoRA module named {adapter_name!r} in the model")
    for attr in ("rank_pattern", "alpha_pattern"):
        for key in getattr(lora_config, attr, None) or {}:
            if not any(re.match(rf"(.*\.)?({key})$", name) for name in built):
                raise ConfigError(
                    f"{attr} key {key!r} matched no LoRA module "
                    f"(they are named like {next(iter(built))!r})"
                )
    patterns = {
        "rank_pattern": (dict(getattr(lora_config, "rank_pattern", None) or {}), lora_config.r),
        "alpha_pattern": (
            dict(getattr(lora_config, "alpha_pattern", None) or {}),
            lora_config.lora_alpha,
        ),
    }
    for name, got in built.items():
        for (attr, (pattern, default)), value, field in zip(
            patterns.items(), got, ("r", "lora_alpha"), strict=True
        ):
            key = pattern_key(pattern, name)
            want = pattern[key] if key is not None else default
            if not math.isclose(value, want):
                source = f"{attr} key {key!r}" if key is not None else f"the config's {field}"
                raise ConfigError(f"{name} got {field}={value:g}, but {source} asks {want:g}")
    return {name: rank for name, (rank, _) in built.items()}


def _lora_modules(peft_model, adapter_name: str) -> dict[str, tuple[int, float]]:
    """Module name in the base model -> (rank as built, lora_alpha) for one adapter."""
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTuner

    # Names relative to the base model, as PEFT matches pattern keys: a PeftModel wraps a
    # tuner (LoraModel) that wraps the base model.
    tuner = peft_model if isinstance(peft_model, BaseTuner) else peft_model.base_model
    found = {}
    for name, module in tuner.model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:
            continue
        if adapter_name in module.lora_A:
            rank = module.lora_A[adapter_name].weight.shape[0]
        else:  # an embedding: lora_embedding_A is a bare parameter of shape (r, vocab)
            rank = module.lora_embedding_A[adapter_name].shape[0]
        if hasattr(module, "parameter_name"):
            # A ParamWrapper: named by its parameter, as PEFT matches pattern keys for it
            # (nested wrappers sit at .base_layer paths); lora_A stacks E experts' rows.
            name = f"{name.replace('.base_layer', '')}.{module.parameter_name}"
            rank //= getattr(module, "num_experts", 1)
        found[name] = (int(rank), float(module.lora_alpha[adapter_name]))
    return found


# -- the LoraSpec of a rank pattern, alpha by policy (--per-layer) ---------------------------
PROPOSALS = ("spectral", "eva")


# PEFT's default: a module's PCA stops once its components' cosine similarity between two
# batches is at least this (EvaConfig.tau).
EVA_TAU = 0.99


def module_alpha(policy: str, reference: LoraSpec, rank: int) -> float:
    """``lora_alpha`` of a module at ``rank`` under the alpha policy (see the module doc).

    >>> ref = LoraSpec(r=16, lora_alpha=32.0)
    >>> module_alpha("fixed", ref, 4), module_alpha("rslora", ref, 4), module_alpha("ratio", ref, 4)
    (32.0, 32.0, 8.0)
    """
    if policy == "ratio":
        return reference.lora_alpha * rank / reference.r
    return reference.lora_alpha


def pattern_spec(reference: LoraSpec, ranks: dict[str, int], policy: str) -> LoraSpec:
    """``reference`` with every module at its rank in ``ranks``: ``r`` is the most common
    rank (on a tie the smaller), the others go to ``rank_pattern``; alpha by the policy."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], -k))
    rank_pattern = {name: k for name, k in ranks.items() if k != r}
    alpha = module_alpha(policy, reference, r)
    alpha_pattern = {
        name: a
        for name, k in rank_pattern.items()
        if (a := module_alpha(policy, reference, k)) != alpha
    }
    return reference.replace(
        r=r,
        lora_alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
        eva_config=None,
    )


def eva_spec(reference: LoraSpec, budget_rank: int, policy: str) -> LoraSpec:
    """EVA at a budget of ``budget_rank`` per module, any module up to ``reference.r``.

    >>> eva_spec(LoraSpec(r=32, lora_alpha=8.0), 4, "fixed").eva_config
    {'rho': 8.0, 'tau': 0.99, 'adjust_scaling_factors': False}
    """
    return reference.replace(
        r=budget_rank,
        lora_alpha=module_alpha(policy, reference, budget_rank),
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights="eva",
        eva_config={
            "rho": max(1.0, reference.r / budget_rank),
            "tau": EVA_TAU,
            "adjust_scaling_factors": policy == "ratio",
        },
    )
