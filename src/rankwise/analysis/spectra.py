"""Spectra of a LoRA adapter: how many of its rank directions each module's update uses.

For any PEFT LoRA adapter folder (``adapter_config.json`` and
``adapter_model.safetensors``; no base model, no pickle) and every adapted module, the
singular values of the update ``ΔW = scaling · B @ A``, from which:

- the *effective rank* at an energy share ``e``: the fewest directions whose squared
  singular values hold ``e`` of ``‖ΔW‖_F²`` (the rule PEFT's ``convert_to_lora`` uses for a
  float rank);
- the *stable rank* ``‖ΔW‖_F² / σ₁²``, a smooth count of the directions that matter;
- the module's share of the whole adapter's ``Σ ‖ΔW‖_F²``;
- a proposed ``rank_pattern`` that keeps ``e`` of every module's energy, with its
  trainable parameter count against the uniform adapter's.

A fused expert parameter (``target_parameters``: a mixture of experts) is split into its E
experts' updates, one spectrum each (:mod:`rankwise.analysis.expert_factors`).

A trained high-rank adapter's spectrum is a cheap second opinion on the rank: on a planted
rank-4 task (tiny Llama), the 90%-energy rank of a trained r=16 adapter was 4-9 per
module. Truncating to it without retraining is pessimistic at small r (there, val loss
4.01 cut to r=4 against 3.84 trained at r=4), so a proposed pattern is something to train
and compare, not a finished adapter.

:func:`rankwise.training.patterns.verify_ranks` checks that PEFT applies such a pattern as asked.

Example:
    >>> import tempfile
    >>> from rankwise.testing import save_tiny_adapter
    >>> path = save_tiny_adapter(tempfile.mkdtemp(), "llama", ranks={"q_proj": 2, "v_proj": 6},
    ...                          r=8, target_modules=["q_proj", "v_proj"])
    >>> spectra = inspect_adapter(path, energy=0.9)
    >>> [(m.kind, m.layer, m.rank, m.effective_rank(0.9)) for m in spectra.modules]
    [('q_proj', 0, 8, 2), ('v_proj', 0, 8, 6), ('q_proj', 1, 8, 2), ('v_proj', 1, 8, 6)]
    >>> proposal = spectra.proposal()
    >>> proposal.r, proposal.rank_pattern
    (2, {'model.layers.0.self_attn.v_proj': 6, 'model.layers.1.self_attn.v_proj': 6})
    >>> proposal.params, proposal.uniform_params
    (2048, 4096)
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from rankwise.analysis.expert_factors import experts_of, split_experts, wrapped_parameters
from rankwise.errors import ConfigError
from rankwise.training.patterns import pattern_value

__all__ = [
    "ModuleSpectrum",
    "AdapterSpectra",
    "RankProposal",
    "inspect_adapter",
    "update_singular_values",
    "effective_rank",
    "stable_rank",
    "module_kinds",
    "format_inspection",
]

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# A saved key: base_model.model.<module name>.lora_A.weight (lora_embedding_A for embeddings,
# which PEFT stores without ".weight"); lora_B.bias (lora_bias=True) is not part of B @ A.
_FACTOR_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<name>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?$"
)


@dataclass(frozen=True)
class ModuleSpectrum:
    """One adapted module: its update's singular values and what follows from them."""

    name: str
    """Module name in the base model, as ``rank_pattern`` keys match it."""
    kind: str
    """Module type: the name after the layer index, e.g. ``q_proj`` (``attn.c_proj`` where
    the last part alone is ambiguous; other indices as ``*``)."""
    layer: int | None
    """Layer index: the first number in the name (None for e.g. ``lm_head``)."""
    rank: int
    """The rank the adapter gave this module (rows of ``lora_A``)."""
    scaling: float
    """lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA, after alpha_pattern."""
    fan_in: int
    """Columns of ``lora_A`` (input features, times the kernel size for a convolution)."""
    fan_out: int
    """Rows of ``lora_B`` (output features)."""
    singular_values: tuple[float, ...]
    """Of ``scaling · B @ A``, descending."""
    expert: int | None = None
    """The expert, for one of a fused expert parameter's E updates (``target_parameters``:
    ``name`` is then the parameter's, ``rank`` each expert's); None for a module."""

    @cached_property
    def energy(self) -> float:
        """‖ΔW‖_F², the sum of squared singular values."""
        return sum(s * s for s in self.singular_values)

    @property
    def stable_rank(self) -> float:
        return stable_rank(self.singular_values)

    def effective_rank(self, energy: float) -> int:
        return effective_rank(self.singular_values, energy)

    def params(self, rank: int | None = None) -> int:
        """Trainable parameters of this module's factors at ``rank`` (default: its own)."""
        return (self.rank if rank is None else rank) * (self.fan_in + self.fan_out)


@dataclass(frozen=True)
class RankProposal:
    """A per-module rank that keeps ``energy`` of each module's update energy."""

    energy: float
    r: int
    """The most common proposed rank: the ``r`` of the proposed ``LoraConfig``."""
    rank_pattern: dict[str, int]
    """Full module name -> rank, for every module whose rank differs from ``r``."""
    ranks: dict[str, int]
    """Every module's proposed rank (at least 1: PEFT needs r >= 1)."""
    params: int
    adapter_params: int
    """Trainable parameters of the adapter as it was saved."""
    uniform_params: int
    """Trainable parameters of every module at the adapter config's ``r``."""


@dataclass(frozen=True)
class AdapterSpectra:
    """Every adapted module's spectrum, read from one adapter folder."""

    path: Path
    config: dict[str, Any]
    modules: tuple[ModuleSpectrum, ...]
    energy: float = 0.9
    """The energy share the proposal and the summary use."""

    @cached_property
    def total_energy(self) -> float:
        return sum(m.energy for m in self.modules)

    def norm_share(self, module: ModuleSpectrum) -> float:
        """The module's share of the adapter's Σ ‖ΔW‖_F² (0 when every update is zero)."""
        total = self.total_energy
        return module.energy / total if total else 0.0

    def summary(self) -> list[dict[str, Any]]:
        """One row per module type × layer: mean effective ranks, summed norm share."""
        cells: dict[tuple[str, int | None], list[ModuleSpectrum]] = {}
        for m in self.modules:
            cells.setdefault((m.kind, m.layer), []).append(m)
        return [
            {
                "type": kind,
                "layer": layer,
                "modules": len(ms),
                "rank": max(m.rank for m in ms),
                "effective_rank": _mean(m.effective_rank(self.energy) for m in ms),
                "effective_rank_90": _mean(m.effective_rank(0.9) for m in ms),
                "effective_rank_99": _mean(m.effective_rank(0.99) for m in ms),
                "stable_rank": _mean(m.stable_rank for m in ms),
                "norm_share": sum(self.norm_share(m) for m in ms),
            }
            for (kind, layer), ms in cells.items()
        ]

    def proposal(self, energy: float | None = None) -> RankProposal:
        """The ``rank_pattern`` that keeps ``energy`` (default: :attr:`energy`) per module."""
        energy = _check_energy(self.energy if energy is None else energy)
        ranks: dict[str, int] = {}
        for m in self.modules:  # a fused parameter's experts share one rank: the largest need
            ranks[m.name] = max(ranks.get(m.name, 1), m.effective_rank(energy))
        counts = Counter(ranks.values())
        r = max(counts, key=lambda k: (counts[k], -k))  # most common; on a tie the smaller
        uniform = int(self.config.get("r") or max(m.rank for m in self.modules))
        return RankProposal(
            energy=energy,
            r=r,
            rank_pattern={n: k for n, k in ranks.items() if k != r},
            ranks=ranks,
            params=sum(m.params(ranks[m.name]) for m in self.modules),
            adapter_params=sum(m.params() for m in self.modules),
            uniform_params=sum(m.params(uniform) for m in self.modules),
        )

    def proposed_config(self) -> dict[str, Any]:
        """``LoraConfig`` keywords for the proposal.

        ``lora_alpha`` and ``alpha_pattern`` stay the adapter's own: which alpha a smaller
        rank should get is the search's alpha policy, not something a spectrum tells.
        """
        p, c = self.proposal(), self.config
        out = {"r": p.r, "lora_alpha": c.get("lora_alpha", 8), "rank_pattern": p.rank_pattern}
        for key in ("alpha_pattern", "target_modules", "use_rslora", "task_type"):
            if c.get(key):
                out[key] = sorted(c[key]) if isinstance(c[key], list) else c[key]
        return out

    def to_dict(self) -> dict[str, Any]:
        """Everything ``rankwise inspect --json`` prints."""
        p = self.proposal()
        return {
            "adapter": str(self.path),
            "r": self.config.get("r"),
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "energy": self.energy,
            "modules": [
                {
                    "name": m.name,
                    "type": m.kind,
                    "layer": m.layer,
                    "expert": m.expert,
                    "rank": m.rank,
                    "scaling": m.scaling,
                    "effective_rank_90": m.effective_rank(0.9),
                    "effective_rank_99": m.effective_rank(0.99),
                    "stable_rank": m.stable_rank,
                    "norm_share": self.norm_share(m),
                    "proposed_rank": p.ranks[m.name],
                    "singular_values": list(m.singular_values),
                }
                for m in self.modules
            ],
            "summary": self.summary(),
            "proposal": {
                "energy": p.energy,
                "lora_config": self.proposed_config(),
                "params": p.params,
                "adapter_params": p.adapter_params,
                "uniform_params": p.uniform_params,
            },
        }


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _check_energy(energy: float) -> float:
    if not (isinstance(energy, int | float) and 0 < energy <= 1):
        raise ConfigError(f"--energy: expected a share of the energy in (0, 1], got {energy}")
    return float(energy)


def effective_rank(singular_values, energy: float) -> int:
    """The fewest leading directions whose squared singular values hold ``energy`` of the sum.

    >>> effective_rank([4.0, 1.0, 0.1], 0.9), effective_rank([4.0, 1.0, 0.1], 0.99)
    (1, 2)
    """
    _check_energy(energy)
    squares = [float(s) ** 2 for s in singular_values]
    # Relative slack 1e-9: energy=1 must not count float32 rounding noise as a direction.
    target, held = energy * sum(squares) * (1 - 1e-9), 0.0
    for k, sq in enumerate(squares, 1):
        held += sq
        if held >= target:
            return k if target > 0 else 0
    return len(squares)


def stable_rank(singular_values) -> float:
    """‖ΔW‖_F² / σ₁² (0 for a zero update): 1 for one direction, k for k equal ones."""
    squares = [float(s) ** 2 for s in singular_values]
    return sum(squares) / max(squares) if squares and max(squares) > 0 else 0.0


def update_singular_values(lora_A, lora_B, scaling: float = 1.0):
    """Singular values of ``scaling · lora_B @ lora_A``, descending, from the factors alone.

    With reduced QR ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (``R`` is r×r), ``B A = Q_B (R_B
    R_Aᵀ) Q_Aᵀ``; the ``Q`` have orthonormal columns, so ``B A`` has the singular values
    of the r×r core: O((d_in + d_out)·r²) work and memory, never a d_out×d_in matrix.
    Convolution factors are flattened to matrices; computed in float64.
    """
    import torch

    a = lora_A.reshape(lora_A.shape[0], -1).double()
    b = lora_B.reshape(lora_B.shape[0], -1).double()
    r_b = torch.linalg.qr(b, mode="r").R
    r_a = torch.linalg.qr(a.T, mode="r").R
    return abs(float(scaling)) * torch.linalg.svdvals(r_b @ r_a.T)


def inspect_adapter(path: str | Path, energy: float = 0.9) -> AdapterSpectra:
    """Read a PEFT LoRA adapter folder and compute every adapted module's spectrum.

    Raises :class:`ConfigError` (one line naming the path) for a missing folder, a missing
    or malformed ``adapter_config.json``, an adapter that is not LoRA, or weights that are
    not a readable safetensors file.
    """
    energy = _check_energy(energy)
    path = Path(path)
    config = read_adapter_config(path)
    factors = _read_factors(path / WEIGHTS_FILE)
    wrapped = wrapped_parameters(config, list(factors))
    kinds = module_kinds([wrapped.get(n, n) for n in factors])
    modules = []
    for saved, (a, b) in factors.items():
        name = wrapped.get(saved, saved)
        kind, layer = kinds[name]
        modules += _spectra(config, name, kind, layer, a, b, expert_parameter=saved in wrapped)
    modules.sort(
        key=lambda m: (m.layer is None, m.layer or 0, _kind_order(m.kind), m.name, m.expert or 0)
    )
    return AdapterSpectra(path, config, tuple(modules), energy)


def _spectra(config, name, kind, layer, a, b, expert_parameter: bool) -> list[ModuleSpectrum]:
    """One module's spectrum, or a fused expert parameter's, one per expert."""
    if not expert_parameter:
        scaling = _scaling(config, name, a.shape[0])
        sv = update_singular_values(a, b, scaling).tolist()
        return [
            ModuleSpectrum(
                name, kind, layer, a.shape[0], scaling, a[0].numel(), b.shape[0], tuple(sv)
            )
        ]
    rank = int(pattern_value(config.get("rank_pattern") or {}, name, config.get("r", a.shape[0])))
    scaling = _scaling(config, name, rank)
    out = []
    for e, (a_e, b_e) in enumerate(split_experts(a, b, experts_of(a, rank, name))):
        sv = tuple(update_singular_values(a_e, b_e, scaling).tolist())
        out.append(ModuleSpectrum(name, kind, layer, rank, scaling, a.shape[1], b.shape[0], sv, e))
    return out


def read_adapter_config(path: Path) -> dict[str, Any]:
    """``adapter_config.json`` of a LoRA adapter folder, checked."""
    if not path.exists():
        raise ConfigError(f"{path}: no such directory (expected a PEFT LoRA adapter folder)")
    if not path.is_dir():
        raise ConfigError(f"{path}: not a directory (expected a PEFT LoRA adapter folder)")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ConfigError(
            f"{path}: no {CONFIG_FILE} (expected a folder written by save_pretrained)"
        )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{file}: malformed JSON") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{file}: peft_type is {config.get('peft_type')!r}, expected 'LORA'")
    return config


def _read_factors(file: Path) -> dict[str, tuple[Any, Any]]:
    """Module name -> (lora_A, lora_B) from a safetensors file (never a pickle)."""
    from safetensors import safe_open

    if not file.is_file():
        bin_file = file.with_name("adapter_model.bin")
        hint = f"; {bin_file.name} is a pickle, which rankwise does not load" * bin_file.exists()
        raise ConfigError(f"{file.parent}: no {file.name}{hint}")
    parts: dict[str, dict[str, Any]] = {}
    try:
        with safe_open(file, framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118  (safe_open is not a dict)
                if match := _FACTOR_KEY.match(key):
                    parts.setdefault(match["name"], {})[match["ab"]] = weights.get_tensor(key)
    except Exception as exc:  # safetensors raises its own error types, and OSError
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{file}: not a readable safetensors file ({reason})") from None
    if not parts:
        raise ConfigError(f"{file}: holds no lora_A/lora_B weights (expected a LoRA adapter)")
    factors = {}
    for name, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ConfigError(f"{file}: {name} has lora_{''.join(ab)} without its pair")
        factors[name] = (ab["A"], ab["B"])
    return factors


def _scaling(config: dict[str, Any], name: str, rank: int) -> float:
    """PEFT's scale of the update: alpha / r, or alpha / sqrt(r) with rsLoRA (arXiv 2312.03732)."""
    alpha = pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# Llama-style types in the order a block runs them; other types follow, alphabetically.
_KIND_ORDER = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"
)  # fmt: skip


def _kind_order(kind: str) -> tuple[int, str]:
    return (_KIND_ORDER.index(kind) if kind in _KIND_ORDER else len(_KIND_ORDER), kind)


def module_kinds(names: list[str]) -> dict[str, tuple[str, int | None]]:
    """Module name -> (type, layer): ``model.layers.3.self_attn.q_proj`` -> (q_proj, 3).

    The type is what follows the layer index, other indices as ``*``, shortened to its
    last part when that alone names one type (GPT-2 has both attn.c_proj and mlp.c_proj).
    """
    parsed = {}
    for name in names:
        parts = name.split(".")
        at = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        rest = parts[at + 1 :] if at is not None else parts[-1:]
        kind = ".".join("*" if p.isdigit() else p for p in rest) or parts[-1]
        parsed[name] = (kind, int(parts[at]) if at is not None else None)
    full_kinds: dict[str, set[str]] = {}
    for kind, _ in parsed.values():
        full_kinds.setdefault(kind.rsplit(".", 1)[-1], set()).add(kind)
    return {
        name: (
            kind.rsplit(".", 1)[-1] if len(full_kinds[kind.rsplit(".", 1)[-1]]) == 1 else kind,
            layer,
        )
        for name, (kind, layer) in parsed.items()
    }


def format_inspection(spectra: AdapterSpectra) -> str:
    """The terminal report: per module, then type × layer, then the proposed pattern."""
    c = spectra.config
    scale = "alpha/sqrt(r) (rsLoRA)" if c.get("use_rslora") else "alpha/r"
    layers = {m.layer for m in spectra.modules}
    names = {m.name for m in spectra.modules}
    fused = {m.name for m in spectra.modules if m.expert is not None}
    experts = f" ({len(fused)} of them fused experts, one row per expert)" if fused else ""
    lines = [
        f"adapter {spectra.path}: LoRA r={c.get('r')}, lora_alpha={c.get('lora_alpha')}, "
        f"scale {scale}, {len(names)} modules{experts} in {len(layers)} layers",
        "singular values of scaling·B@A; energy = their squares; eff@e = fewest directions "
        "holding e of it",
    ]
    if c.get("use_dora"):
        lines.append("DoRA adapter: its magnitude vectors are not part of these spectra")
    return "\n".join(
        lines
        + ["", *_module_lines(spectra), "", *_layer_lines(spectra), "", *_proposal_lines(spectra)]
    )


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """Aligned text columns: the first ``left`` columns to the left, numbers to the right."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    return [
        "  ".join(
            str(x).ljust(w) if i < left else str(x).rjust(w)
            for i, (x, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in [header, *rows]
    ]


def _layer_name(layer: int | None) -> str:
    return "-" if layer is None else str(layer)


def _module_lines(spectra: AdapterSpectra) -> list[str]:
    e = spectra.energy
    ranks = spectra.proposal().ranks
    experts = any(m.expert is not None for m in spectra.modules)
    header = ["type", "layer", "rank", "eff@90", "eff@99", "stable", "share", f"prop@{e:g}"]
    header[2:2] = ["expert"] * experts
    rows = [
        [
            m.kind,
            _layer_name(m.layer),
            *([_layer_name(m.expert)] * experts),
            str(m.rank),
            str(m.effective_rank(0.9)),
            str(m.effective_rank(0.99)),
            f"{m.stable_rank:.2f}",
            f"{spectra.norm_share(m):.1%}",
            str(ranks[m.name]),
        ]
        for m in spectra.modules
    ]
    return ["per module (share: of the adapter's Σ‖ΔW‖_F²; prop: proposed rank)"] + _table(
        header, rows
    )


def _layer_lines(spectra: AdapterSpectra) -> list[str]:
    """Effective rank at the chosen energy: one row per layer, one column per module type."""
    cells = {(row["type"], row["layer"]): row for row in spectra.summary()}
    kinds = list(dict.fromkeys(m.kind for m in spectra.modules))
    layers = list(dict.fromkeys(m.layer for m in spectra.modules))
    rows = []
    for layer in layers:
        mine = [cells.get((k, layer)) for k in kinds]
        share = sum(c["norm_share"] for c in mine if c)
        rows.append(
            [_layer_name(layer)]
            + [f"{c['effective_rank']:.3g}" if c else "" for c in mine]
            + [f"{share:.1%}"]
        )
    shares = [sum(c["norm_share"] for (k, _), c in cells.items() if k == kind) for kind in kinds]
    rows.append(["share"] + [f"{s:.1%}" for s in shares] + [""])
    title = f"effective rank @{spectra.energy:g} by layer × module type (share: of Σ‖ΔW‖_F²)"
    return [title] + _table(["layer", *kinds, "share"], rows)


def _proposal_lines(spectra: AdapterSpectra) -> list[str]:
    p = spectra.proposal()
    pattern = (
        json.dumps(p.rank_pattern)
        if len(p.rank_pattern) <= 8
        else (f"{len(p.rank_pattern)} keys (all of them with --json)")
    )
    ratio = p.params / p.uniform_params if p.uniform_params else 0.0
    lines = [
        f"proposed (keeps {p.energy:.0%} of every module's energy): r={p.r}, "
        f"rank_pattern={pattern}",
        f"trainable parameters: {p.params:,} proposed vs {p.uniform_params:,} uniform "
        f"r={spectra.config.get('r')} ({ratio:.1%})",
    ]
    if p.adapter_params != p.uniform_params:
        lines.append(f"(the adapter as saved has {p.adapter_params:,})")
    return lines
