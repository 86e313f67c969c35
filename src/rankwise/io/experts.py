"""Parameters PEFT wraps directly: the fused experts of a mixture-of-experts model.

A mixture-of-experts layer in transformers 5 holds its E experts as 3-D parameters of one
module, not as E ``nn.Linear`` (Qwen3-MoE: ``mlp.experts.gate_up_proj`` of shape (E, 2f, d)
and ``mlp.experts.down_proj`` (E, d, f), applied as ``F.linear(x, W[e])``), so no
``target_modules`` reaches them. PEFT (0.17+, peft#2638) wraps such a parameter in a
``ParamWrapper`` when ``target_parameters`` names it: rank r for each expert, ``lora_A``
of shape (r·E, in) and ``lora_B`` (out, r·E), and ``scaling · B_e @ A_e`` added to the
weight of expert e before each forward (peft ``tuners/lora/layer.py``).

``experts`` is rankwise's shorthand for every such parameter of the model: the 3-D
parameters of modules named like experts, written as the shortest name suffixes that pick
out exactly them (PEFT matches a name or a suffix, as for modules).

Example:
    >>> from rankwise.testing import tiny_model
    >>> model = tiny_model("qwen3_moe")
    >>> names = resolve_target_parameters(model, ["experts"]); names
    ['experts.gate_up_proj', 'experts.down_proj']
    >>> shapes = targeted_parameters(model, names)
    >>> shapes["model.layers.0.mlp.experts.down_proj"]
    ParameterShape(experts=4, fan_in=32, fan_out=64)
    >>> shapes["model.layers.0.mlp.experts.down_proj"].params(rank=2)  # 2·4·(32 + 64)
    768
"""

from __future__ import annotations

from dataclasses import dataclass

from rankwise.errors import ConfigError

__all__ = [
    "EXPERTS",
    "ParameterShape",
    "parameter_shape",
    "expert_parameters",
    "resolve_target_parameters",
    "targeted_parameters",
]

EXPERTS = "experts"


@dataclass(frozen=True)
class ParameterShape:
    """A targeted parameter as PEFT's ``ParamWrapper`` shapes its LoRA factors."""

    experts: int
    """E: the leading dimension of a 3-D parameter (1 for a 2-D one)."""
    fan_in: int
    """Columns of ``lora_A`` (each expert's input features)."""
    fan_out: int
    """Rows of ``lora_B`` (each expert's output features)."""

    def params(self, rank: int) -> int:
        """Trainable parameters at ``rank`` per expert: A (r·E, in) and B (out, r·E)."""
        return rank * self.experts * (self.fan_in + self.fan_out)

    @property
    def max_rank(self) -> int:
        """The largest rank an expert's update can have: min(in, out)."""
        return min(self.fan_in, self.fan_out)


def parameter_shape(param, module) -> ParameterShape | None:
    """The LoRA shape of ``param`` on ``module``; None where PEFT cannot wrap it (1-D).

    A 3-D parameter is (experts, out, in), as ``F.linear`` takes each expert's slice, unless
    the module says ``is_transposed`` (experts, in, out): PEFT's own rule.
    """
    shape = tuple(param.shape)
    if len(shape) == 2:
        return ParameterShape(1, shape[1], shape[0])
    if len(shape) != 3:
        return None
    experts, first, second = shape
    if getattr(module, "is_transposed", False):
        return ParameterShape(experts, first, second)
    return ParameterShape(experts, second, first)


def _matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule for ``target_parameters``: the full name, or a suffix after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _parameters(model) -> dict[str, tuple]:
    """Full parameter name -> (parameter, owning module), in registration order."""
    return {
        f"{owner}.{name}" if owner else name: (param, module)
        for owner, module in model.named_modules()
        for name, param in module.named_parameters(recurse=False)
    }


def _three_d(model) -> list[str]:
    return [n for n, (p, _) in _parameters(model).items() if p.ndim == 3]


def expert_parameters(model) -> list[str]:
    """Full names of the 3-D parameters of modules named like experts, in model order."""
    return [n for n in _three_d(model) if "expert" in n.rpartition(".")[0].lower()]


def _shortest_suffixes(names: list[str], everything: list[str]) -> list[str]:
    """The shortest name suffixes (two parts or more) that match exactly ``names`` among
    ``everything``, each once, in the order ``names`` first has it."""
    wanted, longest = set(names), max(n.count(".") + 1 for n in names)
    for parts in range(2, longest + 1):
        suffixes = list(dict.fromkeys(".".join(n.split(".")[-parts:]) for n in names))
        if {n for n in everything if _matches(n, suffixes)} == wanted:
            return suffixes
    return list(names)


def resolve_target_parameters(model, names: list[str] | None) -> list[str] | None:
    """``--target-parameters`` as PEFT takes it: ``experts`` expanded, every name checked.

    Raises :class:`ConfigError` (one line naming the flag) for ``experts`` on a model with
    no fused experts, and for a name that matches no parameter, listing the model's 3-D
    parameters.
    """
    if not names:
        return None
    everything = list(_parameters(model))
    out: list[str] = []
    for name in dict.fromkeys(names):
        if name == EXPERTS:
            out += _expert_suffixes(model, everything)
        elif any(_matches(n, [name]) for n in everything):
            out.append(name)
        else:
            raise ConfigError(
                f"--target-parameters: the model has no parameter named {name}; "
                f"{_three_d_listing(model, everything)}"
            )
    return list(dict.fromkeys(out))


def _expert_suffixes(model, everything: list[str]) -> list[str]:
    experts = expert_parameters(model)
    if not experts:
        kind = getattr(getattr(model, "config", None), "model_type", None) or "the model"
        raise ConfigError(
            f"--target-parameters experts: {kind} has no experts (no 3-D parameter under a "
            f"module named like experts); {_three_d_listing(model, everything)}"
        )
    return _shortest_suffixes(experts, everything)


def _three_d_listing(model, everything: list[str]) -> str:
    """The model's 3-D parameters, as the shortest suffixes that name them."""
    three_d = _three_d(model)
    if not three_d:
        return "it has no 3-D parameters (no fused experts): use --target-modules"
    return f"its 3-D parameters are: {', '.join(_shortest_suffixes(three_d, everything))}"


def targeted_parameters(model, names: list[str] | None) -> dict[str, ParameterShape]:
    """Full name -> LoRA shape of every parameter PEFT wraps for ``target_parameters``."""
    if not names:
        return {}
    out = {}
    for full, (param, module) in _parameters(model).items():
        if _matches(full, names) and (shape := parameter_shape(param, module)) is not None:
            out[full] = shape
    return out
