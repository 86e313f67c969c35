"""Nested-rank training: one adapter at the largest rank whose every truncation is usable.

DyLoRA (Valipour et al. 2022, arXiv 2210.07558) trains a range of ranks at once: each
optimizer step draws a rank ``b`` and only the first ``b`` rank components of the adapter
take part, scaled as a rank-``b`` adapter would be. After one run, the first ``r`` rows of
every ``lora_A`` and columns of every ``lora_B`` form a trained rank-``r`` adapter, so the
whole rank curve costs about one trial. On this project's planted-rank task (FIELD.md) the
nested curve sat slightly above separately trained adapters but put the knee at the same
rank, for a fifth of the grid's compute; plain truncation of an ordinarily trained adapter
moved the knee up.

This is built on PEFT's own LoRA layers, not a LoRA rewrite: :func:`active_rank` masks the
output of each ``lora_A[adapter]`` (a forward hook multiplying components ``>= b`` by 0, so
their gradients are exactly 0) and sets ``layer.scaling[adapter]`` to the rank-``b`` scale.

Example (an r=4 adapter run as its rank-2 truncation under a fixed alpha of 8):
    >>> import torch
    >>> from peft import LoraConfig, get_peft_model
    >>> from rankwise.testing import tiny_model
    >>> model = get_peft_model(tiny_model(), LoraConfig(r=4, lora_alpha=8,
    ...                                                 target_modules=["q_proj"]))
    >>> ids = torch.tensor([[5, 6, 7]])
    >>> with active_rank(model, 2, scale=8 / 2):
    ...     logits = model(input_ids=ids).logits
    >>> logits.shape
    torch.Size([1, 3, 128])

Bookkeeping of a nested run (:func:`run_nested`): it returns one
:class:`~rankwise.records.TrialResult` per rank, keyed ``nested-r{r}-s{seed}``. The shared
cost is charged once, to the ``r_max`` record: its ``train_tokens`` is the run's total and
its ``wall_seconds`` is everything (set-up, training, its own evaluations and save) except
what the other ranks' own evaluations and saves took, which their records carry (their
``train_tokens`` is 0). Summing either field over the records gives the run's total, as a
search's compute should. ``extra`` holds the shared totals for every record.

Resume: results exist only once the whole run has ended. An interrupted nested run is
simply run again from the start (nothing of it was recorded; its adapter folders are
overwritten atomically).
"""

from __future__ import annotations

import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from rankwise.records import NestedRun, TrialResult, TrialSpec
from rankwise.storage.rundir import RunDir
from rankwise.training.adapter import TrialContext
from rankwise.training.hooks import Hooks, Run, trial_result
from rankwise.training.lifecycle import Progress, run_lifecycle

__all__ = [
    "active_rank",
    "run_nested",
    "save_truncated",
    "truncate_state",
    "lora_alpha_for",
    "RankSampler",
    "DISTRIBUTIONS",
    "nested_key",
    "nested_adapter_dir",
    "NestedHooks",
    "SharedScale",
]

ScaleFor = Callable[[int], float]

DISTRIBUTIONS = ("uniform-list", "uniform-r")
# The rank draws get their own stream: the data order is seeded with spec.seed exactly as
# in run_trial, so a nested run sees the same batches as every separately trained rank.
RANK_SEED_OFFSET = 7919


def nested_key(rank: int, seed: int, group: str = "") -> str:
    """Trial key of rank ``rank`` of a nested run (a sibling of the Study's ``r{rank}-s{seed}``,
    prefixed ``group/`` like the Study's keys when the run belongs to a group)."""
    key = f"nested-r{rank}-s{seed}"
    return f"{group}/{key}" if group else key


def lora_alpha_for(scale: float, r: int, use_rslora: bool = False) -> float:
    """The ``lora_alpha`` that makes PEFT's own scaling of a rank-``r`` adapter ``scale``
    (PEFT: alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    alpha = scale * (math.sqrt(r) if use_rslora else r)
    alpha = float(f"{alpha:.12g}")  # 8/2*2 → 8.0, not 7.999999999999999
    return int(alpha) if alpha.is_integer() else alpha


class SharedScale:
    """One LoRA scale for every truncation (``--nested-scale shared``): a larger truncation
    then only adds components to a smaller one, instead of rescaling them.

    Example (fixed alpha 8 over ranks 1..32: the policy's scale at the middle rank 8):
        >>> s = SharedScale.middle([1, 2, 4, 8, 16, 32], lambda r: 8 / r)
        >>> s(1), s(32), s
        (1.0, 1.0, SharedScale(1))
    """

    def __init__(self, scale: float):
        self.scale = float(scale)

    @classmethod
    def middle(cls, ranks: list[int], scaling: ScaleFor) -> SharedScale:
        """The scale the policy gives the geometric middle of ``ranks``."""
        ranks = sorted(ranks)
        return cls(scaling(ranks[len(ranks) // 2]))

    def __call__(self, rank: int) -> float:
        return self.scale

    def __repr__(self) -> str:
        return f"SharedScale({self.scale:g})"


# -- the rank mask on PEFT's layers ---------------------------------------------------------
def _lora_layers(peft_model, adapter: str) -> list:
    from peft.tuners.lora import LoraLayer

    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
    if not layers:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter!r}")
    for layer in layers:
        if adapter in getattr(layer, "lora_variant", {}):
            raise ValueError("nested training supports plain LoRA only (no DoRA or variants)")
        if not isinstance(layer.lora_A[adapter], torch.nn.Linear):
            raise ValueError(
                f"nested training supports linear LoRA layers only, not "
                f"{type(layer.lora_A[adapter]).__name__}"
            )
    return layers


def _masker(mask: torch.Tensor):
    def hook(module, args, out):
        return out * mask  # a product, not a slice: inactive components get zero gradients

    return hook


@contextmanager
def active_rank(peft_model, b: int, scale: float, adapter: str | None = None) -> Iterator[None]:
    """Within the block, the adapter acts as its rank-``b`` truncation scaled by ``scale``.

    Every LoRA layer keeps only the first ``b`` components of ``lora_A``'s output and
    multiplies ``lora_B``'s output by ``scale`` instead of its own scaling; both are restored
    on exit. Gradients of components ``>= b`` are exactly zero.
    """
    adapter = adapter or peft_model.active_adapter
    handles, saved = [], []
    try:
        for layer in _lora_layers(peft_model, adapter):
            r = layer.r[adapter]
            if not 1 <= b <= r:
                raise ValueError(f"active rank {b} is outside 1..{r} (the adapter's rank)")
            weight = layer.lora_A[adapter].weight
            mask = (torch.arange(r, device=weight.device) < b).to(weight.dtype)
            handles.append(layer.lora_A[adapter].register_forward_hook(_masker(mask)))
            saved.append((layer, layer.scaling[adapter]))
            layer.scaling[adapter] = scale
        yield
    finally:
        for handle in handles:
            handle.remove()
        for layer, scaling in saved:
            layer.scaling[adapter] = scaling


def _hold_inactive(layers: list, adapter: str, b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of the components ``>= b``, to put back after the optimizer step.

    Their gradients are zero, but AdamW would still move them by its running moment
    estimates (and weight decay): a component that took no part in a step must not change.
    """
    held = []
    for layer in layers:
        a, bw = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if b < a.shape[0]:
            held += [(a[b:], a[b:].detach().clone()), (bw[:, b:], bw[:, b:].detach().clone())]
    return held


@torch.no_grad()
def _restore(held: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for view, copy in held:
        view.copy_(copy)


class RankSampler:
    """Draws the active rank of each step from ``ranks``.

    ``uniform-list``: every listed rank equally often (log-uniform in r for a doubling list).
    ``uniform-r``: r uniform over 1..r_max, rounded up to the next listed rank (DyLoRA's
    draw), so a listed rank has probability (r_i - r_{i-1}) / r_max and large ranks dominate.

    Example:
        >>> RankSampler([1, 2, 4, 8], "uniform-r", seed=0).probabilities
        {1: 0.125, 2: 0.125, 4: 0.25, 8: 0.5}
    """

    def __init__(self, ranks: list[int], distribution: str = "uniform-list", seed: int = 0):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"distribution: expected one of {', '.join(DISTRIBUTIONS)}, got {distribution!r}"
            )
        self.ranks, self.distribution = sorted(ranks), distribution
        if distribution == "uniform-list":
            weights = [1.0] * len(self.ranks)
        else:
            weights = [float(r - p) for r, p in zip(self.ranks, [0] + self.ranks[:-1], strict=True)]
        self.weights = torch.tensor(weights, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(seed)

    @property
    def probabilities(self) -> dict[int, float]:
        p = self.weights / self.weights.sum()
        return {r: float(x) for r, x in zip(self.ranks, p, strict=True)}

    def __call__(self) -> int:
        return self.ranks[int(torch.multinomial(self.weights, 1, generator=self.gen))]


# -- truncated adapters -------------------------------------------------------------------
def truncate_state(state: Mapping[str, torch.Tensor], r: int) -> dict[str, torch.Tensor]:
    """The first ``r`` components of a PEFT adapter state dict (``lora_A`` rows, ``lora_B``
    columns), as contiguous copies; other entries (e.g. biases) are copied whole."""
    out = {}
    for key, value in state.items():
        if "lora_embedding_" in key:
            raise ValueError(f"{key}: truncating embedding LoRA is not supported")
        if key.endswith("lora_A.weight"):
            value = value[:r]
        elif key.endswith("lora_B.weight"):
            value = value[:, :r]
        out[key] = value.detach().clone(memory_format=torch.contiguous_format)
    return out


def save_truncated(
    source, r: int, out_dir: str | Path, scale: float, config=None, adapter: str | None = None
) -> Path:
    """Write the rank-``r`` truncation of an adapter as an ordinary PEFT adapter folder.

    ``source`` is a PeftModel (its ``adapter``) or a PEFT adapter state dict (keys as
    ``get_peft_model_state_dict`` gives them; then ``config`` is the LoraConfig or its
    kwargs). ``lora_alpha`` is chosen so that PEFT's scaling of the saved rank-``r`` adapter
    equals ``scale``. The folder loads with ``PeftModel.from_pretrained`` and is replaced
    atomically.
    """
    import copy

    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    if isinstance(source, Mapping):
        if config is None:
            raise ValueError("save_truncated: a state dict needs its config")
        state = source
        config = (
            config
            if isinstance(config, LoraConfig)
            else LoraConfig(task_type="CAUSAL_LM", **dict(config))
        )
    else:
        adapter = adapter or source.active_adapter
        config = source.peft_config[adapter]
        state = get_peft_model_state_dict(source, adapter_name=adapter)
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError(
            "save_truncated: adapters with rank_pattern/alpha_pattern are not supported"
        )
    config = copy.deepcopy(config)
    config.r = r
    config.lora_alpha = lora_alpha_for(scale, r, config.use_rslora)
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config.save_pretrained(str(tmp))
    save_file(
        truncate_state(state, r), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"}
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# -- the nested run: hooks on the one trial lifecycle ----------------------------------------
def _check(spec: TrialSpec, ranks: list[int], distribution: str) -> list[int]:
    ranks = sorted(set(ranks))
    if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
        raise ValueError(f"ranks: expected positive integers, got {ranks!r}")
    if spec.lora.r != ranks[-1]:
        raise ValueError(
            f"nested: spec.lora.r must be the largest rank {ranks[-1]}, got {spec.lora.r}"
        )
    if spec.lora.rank_pattern or spec.lora.alpha_pattern:
        raise ValueError("nested: rank_pattern/alpha_pattern are not supported (one rank for all)")
    RankSampler(ranks, distribution)  # validates the distribution
    return ranks


class NestedHooks(Hooks):
    """Nested-rank training's difference from a plain trial: a drawn active rank per
    optimizer step (the inactive components held still), one view per truncation (the loop
    evaluates each and keeps its best), and each rank's best saved as a plain rank-r adapter."""

    def __init__(self, ranks: list[int], scale_for: ScaleFor, draw: RankSampler):
        self.ranks, self.scale_for, self.draw = ranks, scale_for, draw
        self.steps_at = dict.fromkeys(ranks, 0)
        self.trainable: dict[int, int] = {}
        self.b = ranks[-1]

    def attached(self, peft_model, run: Run) -> None:
        self.adapter = peft_model.active_adapter
        self.layers = _lora_layers(peft_model, self.adapter)
        self.trainable = _standalone_params(peft_model, self.layers, self.adapter, self.ranks)

    def step(self, peft_model, step: int):
        self.b = self.draw()
        self.steps_at[self.b] += 1
        return active_rank(peft_model, self.b, self.scale_for(self.b), self.adapter)

    def optimizer_step(self, peft_model, optimizer) -> None:
        held = _hold_inactive(self.layers, self.adapter, self.b)
        optimizer.step()
        _restore(held)

    def views(self, peft_model, run: Run) -> dict[int, Callable]:
        """Every truncation, each as the rank-r adapter it stands for."""
        return {
            r: partial(active_rank, peft_model, r, self.scale_for(r), self.adapter)
            for r in self.ranks
        }

    def checkpoint(self, peft_model, view: int) -> dict[str, torch.Tensor]:
        """Rank ``view``'s truncation of the adapter (what :meth:`save` writes)."""
        from peft import get_peft_model_state_dict

        return truncate_state(get_peft_model_state_dict(peft_model), view)

    def save(self, peft_model, run: Run) -> None:
        config = peft_model.peft_config[self.adapter]
        for r in self.ranks:
            curve = run.curve(r)
            if curve.best_state is None:
                continue
            t = time.perf_counter()
            save_truncated(
                curve.best_state, r, nested_adapter_dir(run.spec, r), self.scale_for(r), config
            )
            curve.own_seconds += time.perf_counter() - t

    def results(self, run: Run) -> list[TrialResult]:
        """One record per rank; the shared cost is charged to r_max (see the module doc)."""
        spec, r_max = run.spec, self.ranks[-1]
        wall = run.wall_seconds
        others = sum(run.curve(r).own_seconds for r in self.ranks if r != r_max)
        shared = {
            "nested": True,
            "r_max": r_max,
            "distribution": self.draw.distribution,
            "rank_probability": {str(r): p for r, p in self.draw.probabilities.items()},
            "shared_train_tokens": run.tokens,
            "shared_wall_seconds": wall,
        }
        out = []
        for r in self.ranks:
            top = r == r_max
            setup = run.first_step_at - run.started_at if top and run.first_step_at else 0.0
            out.append(
                trial_result(
                    run,
                    view=r,
                    key=nested_key(r, spec.seed, spec.group),
                    rank=r,
                    lora_alpha=lora_alpha_for(self.scale_for(r), r, spec.lora.use_rslora),
                    trainable_params=self.trainable.get(r),
                    train_tokens=run.tokens if top else 0,
                    wall_seconds=wall - others if top else run.curve(r).own_seconds,
                    setup_seconds=setup,
                    tokens_per_second=run.tokens / wall if top and run.tokens else None,
                    extra={**shared, "steps_at_rank": self.steps_at[r]},
                )
            )
        return out


def _standalone_params(peft_model, layers: list, adapter: str, ranks: list[int]) -> dict[int, int]:
    """Trainable parameters of a standalone rank-r adapter: PEFT's count at r_max, less
    (r_max - r)·(in + out) per LoRA layer."""
    total = peft_model.get_nb_trainable_parameters()[0]
    per_rank = sum(
        layer.lora_A[adapter].in_features + layer.lora_B[adapter].out_features for layer in layers
    )
    return {r: total - (ranks[-1] - r) * per_rank for r in ranks}


def nested_adapter_dir(spec: TrialSpec, rank: int) -> Path | None:
    """Where rank ``rank``'s adapter goes: a sibling trial folder of ``spec.adapter_dir``,
    named after its key as the Study names trial folders (``/`` → ``_``)."""
    if not spec.adapter_dir:
        return None
    return RunDir.of_adapter(spec.adapter_dir).trial_adapter(
        nested_key(rank, spec.seed, spec.group)
    )


def with_nested(
    spec: TrialSpec, ranks: list[int], scale_for: ScaleFor, distribution: str = "uniform-list"
) -> TrialSpec:
    """``spec`` as a nested-rank run over ``ranks``: each truncation's scale read off the
    alpha policy's ``scale_for`` and written into the spec (:class:`NestedRun`)."""
    run = NestedRun(tuple(ranks), tuple(scale_for(r) for r in ranks), distribution)
    return spec.replace(nested=run)


def run_nested(
    spec: TrialSpec, ctx: TrialContext, progress: Progress | None = None
) -> list[TrialResult]:
    """Train one adapter at ``max(spec.nested.ranks)`` with nested ranks; one result per rank.

    ``spec`` is the ``r_max`` trial's spec (``spec.lora.r == max(ranks)``), and
    ``spec.nested`` (:func:`with_nested`) names the truncations, each one's LoRA scale under
    the alpha policy (fixed: alpha/r; rslora: alpha/sqrt(r); ratio: k) and the rank draw. Each rank's best checkpoint is saved as a plain rank-r adapter
    in :func:`nested_adapter_dir`. A failure (OOM, NaN, error) fails every rank's record.
    Early stopping (``spec.train.early_stopping_patience``) ends the run once no truncation
    has improved for that many evaluations (:func:`rankwise.training.lifecycle._stalled`).
    """
    if spec.nested is None:
        raise ValueError(f"{spec.key}: not a nested-rank run (no spec.nested)")
    n = spec.nested
    ranks = _check(spec, list(n.ranks), n.distribution)
    draw = RankSampler(ranks, n.distribution, seed=spec.seed + RANK_SEED_OFFSET)
    return run_lifecycle(spec, ctx, NestedHooks(ranks, n.scale_for, draw), progress)
