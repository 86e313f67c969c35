"""Branched trials (``--branch-at``): the trunk saves its training state at the branch step;
every other rank of its seed starts from that state and trains the rest of the schedule.

Which trial is a trunk and which a branch is decided before training, from the run
directory (:mod:`rankwise.run.branching`); this module does the training side, through
:class:`Branching`, the lifecycle's :class:`~rankwise.training.hooks.Hooks` for both.

**The saved state** (``DIR/trials/<trunk>/trunk``, never pickle): ``state.safetensors``
holds the trainable parameters, the AdamW state of each (``step``, ``exp_avg``,
``exp_avg_sq``), the torch RNG state(s) and the data order (the block sampler's generator
and the blocks left of its epoch); ``state.json`` holds the rest: the step, the schedule's
state and learning rate, each adapted module's rank and LoRA scale as PEFT applied them,
and the trunk's TrainSpec (a branch trains the same one, checked). Continuing from it is
bit-for-bit the trunk's own continuation (tests/test_branch.py).

**Growing** (a branch of rank r1 above the trunk's r0). ΔW = s·B·A, with s PEFT's scale
(alpha/r, or alpha/sqrt(r) with rsLoRA; alpha by the run's policy, so s may change with r).
The branch's adapter is PEFT's fresh init at r1 (A random with the trial's seed, B = 0);
its first r0 components become the trunk's, each factor times c = sqrt(s0/s1), so that
s1·(cB0)(cA0) = s0·B0·A0, and its new components keep B = 0: the update, and so the model,
is exactly the trunk's at the branch step, with r1 - r0 fresh directions free to grow.

Optimizer moments: carried for the existing components, zero for the new ones. With the
factors scaled by c, the gradient of each is scaled by 1/c (dL/dA' = s1·B'ᵀG = (1/c)·s0·B0ᵀG),
so the moments become m/c and v/c²: what Adam would hold had it trained this
parametrisation along the same path, and the update direction m/sqrt(v) is the trunk's.
Fresh moments would instead restart the bias correction of components that are half
trained, a jolt at the largest rates the schedule has left. Zero moments for the new
components are what they have: no history. (The AdamW step count is one per tensor, the
trunk's, so their first updates are not bias-corrected the way a fresh trial's are; with
Adam's betas (0.9, 0.999) and t in the hundreds, their steps run at up to a few times the
normalised size for the first tens of steps. bench/branch.py measures the outcome against
fresh trials of the same rank and seed.)

**Shrinking** (r1 below r0): the best rank-r1 approximation of the trunk's ΔW per module
(Eckart-Young, as bench/archive/truncate.py), B' = U·sqrt(S/s1), A' = sqrt(S/s1)·Vᵀ, computed from
QR factors of B0 and A0ᵀ so only an r0 × r0 matrix is decomposed. The optimizer starts
fresh: the truncated components mix the trunk's, so no moment belongs to them.

Whatever is trainable besides the LoRA factors (biases with ``bias="all"``, a classifier
head, DoRA's magnitudes) is carried as it is, with its moments when they are carried.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from rankwise.errors import ConfigError
from rankwise.records import Branch, TrialResult, TrialSpec
from rankwise.storage.rundir import TRUNK_META, TRUNK_TENSORS
from rankwise.training.hooks import Hooks, Run, trial_result

__all__ = ["Branching", "load_state", "lora_scales"]

ADAPTER = "default"  # PEFT's adapter name: the trials attach one adapter, by this name


class Branching(Hooks):
    """The lifecycle's hooks for a trunk (save at the branch step) or a branch (start from
    the trunk's state at the branch step, grown, shrunk or continued)."""

    def __init__(self, spec: TrialSpec):
        self.branch: Branch = spec.branch
        self.spec = spec
        self.state: tuple[dict, dict] | None = None  # a branch's trunk state: tensors, meta
        self.saved = False

    # -- a branch -------------------------------------------------------------------------
    def attached(self, peft_model, run: Run) -> None:
        if self.branch.is_trunk:
            return
        self.state = load_state(self.branch.checkpoint, self.spec)
        tensors, meta = self.state
        start_adapter(peft_model, tensors, meta["scales"], self.branch.role)

    def resume(self, peft_model, optimizer, schedule, batches) -> int:
        if self.branch.is_trunk:
            return 0
        tensors, meta = self.state
        if self.branch.role != "shrunk":  # shrunk: the optimizer starts fresh
            names = _trainable_names(peft_model, optimizer)
            scales = _rescale(meta["scales"], lora_scales(peft_model))
            optimizer.load_state_dict(_optimizer_state(optimizer, names, tensors, scales))
        scheduler = getattr(schedule, "scheduler", schedule)
        scheduler.load_state_dict({**meta["schedule"], **_kept_lambdas(scheduler)})
        for group, lr in zip(optimizer.param_groups, meta["lr"], strict=True):
            group["lr"] = lr
        batches.gen.set_state(tensors["data.generator"])
        batches.order = tensors["data.order"].tolist()
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        self.state = None  # the trial holds its own copies now
        return meta["step"]

    # -- a trunk --------------------------------------------------------------------------
    def stepped(self, peft_model, step: int, optimizer, schedule, batches) -> None:
        if self.branch.is_trunk and step == self.branch.step:
            save_state(self.branch.checkpoint, self.spec, peft_model, optimizer, schedule, batches)
            self.saved = True

    def results(self, run: Run) -> list[TrialResult]:
        result = trial_result(run)
        if self.branch.is_trunk and not self.saved:  # stopped before the branch step
            result = result.replace(branch=None)
        return [result]


# -- saving -----------------------------------------------------------------------------------
def save_state(folder, spec: TrialSpec, peft_model, optimizer, schedule, batches) -> None:
    """Write the trunk's state: tensors first, then ``state.json`` (atomically), whose
    presence says the state is whole (rankwise.run.branching reads it)."""
    from safetensors.torch import save_file

    from rankwise.training.hooks import trainable_state

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TRUNK_META).unlink(missing_ok=True)  # a trunk run again: whole again at the end
    tensors = {f"param.{k}": v for k, v in trainable_state(peft_model).items()}
    names = _trainable_names(peft_model, optimizer)
    for index, entry in optimizer.state_dict()["state"].items():
        for what, value in entry.items():
            tensors[f"opt.{what}.{names[index]}"] = torch.as_tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    tensors["data.generator"] = batches.gen.get_state()
    tensors["data.order"] = torch.tensor(batches.order, dtype=torch.int64)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    tmp = folder / (TRUNK_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(folder / TRUNK_TENSORS)
    scheduler = getattr(schedule, "scheduler", schedule)
    meta = {
        "key": spec.key,
        "seed": spec.seed,
        "group": spec.group,
        "rank": spec.rank,
        "step": spec.branch.step,
        "branch": dataclasses.asdict(spec.branch),
        "train": dataclasses.asdict(spec.train),
        "scales": lora_scales(peft_model),
        "schedule": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
        "lr": [g["lr"] for g in optimizer.param_groups],
    }
    tmp = folder / (TRUNK_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    tmp.replace(folder / TRUNK_META)


def _trainable_names(peft_model, optimizer) -> list[str]:
    """The name of each parameter in the optimizer's order (its state_dict indices)."""
    name_of = {id(p): n for n, p in peft_model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def lora_scales(peft_model) -> dict[str, list[float]]:
    """Each adapted module's ``[rank, scale]`` as PEFT applied them (scale multiplies B·A)."""
    from peft.tuners.lora import LoraLayer

    return {
        name: [int(module.r[ADAPTER]), float(module.scaling[ADAPTER])]
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.r
    }


# -- loading ----------------------------------------------------------------------------------
def load_state(folder, spec: TrialSpec) -> tuple[dict[str, torch.Tensor], dict]:
    """The trunk's saved state (tensors, meta), checked against the branch's spec."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / TRUNK_META).is_file():
        raise FileNotFoundError(f"no trunk state in {folder} (its {TRUNK_META} is missing)")
    meta = json.loads((folder / TRUNK_META).read_text())
    if meta["train"] != json.loads(json.dumps(dataclasses.asdict(spec.train))):
        raise ValueError(
            f"the trunk state in {folder} was trained with other settings than {spec.key}"
        )
    return load_file(str(folder / TRUNK_TENSORS)), meta


def _rank_dim(name: str) -> int | None:
    """The rank axis of a LoRA factor (A: rows, B: columns), None for anything else."""
    if ".lora_A." in name or ".lora_embedding_A." in name:
        return 0
    if ".lora_B." in name or ".lora_embedding_B." in name:
        return 1
    return None


def _module(name: str) -> str:
    return name.split(".lora_", 1)[0]


def _rescale(trunk: dict, branch: dict) -> dict[str, float]:
    """c = sqrt(s0/s1) per module: the factor each carried factor is multiplied by."""
    return {m: math.sqrt(trunk[m][1] / branch[m][1]) for m in branch}


@torch.no_grad()
def start_adapter(peft_model, tensors: dict, trunk_scales: dict, role: str) -> None:
    """Put the trunk's adapter into the branch's: grown or continued (the same update,
    new components at B = 0) or shrunk (the update's best approximation at the rank)."""
    branch_scales = lora_scales(peft_model)
    if set(branch_scales) != set(trunk_scales):
        raise ValueError("the trunk's adapted modules are not the branch's")
    scales = _rescale(trunk_scales, branch_scales)
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    for name, p in params.items():
        saved, dim = tensors[f"param.{name}"], _rank_dim(name)
        if dim is None:
            p.copy_(saved)
            continue
        module = _module(name)
        _check_factor(name, p, saved, dim, branch_scales[module][0], trunk_scales[module][0])
        if role != "shrunk":
            r0 = saved.shape[dim]
            p.narrow(dim, 0, r0).copy_(saved * scales[module])
            if dim == 1:
                p.narrow(1, r0, p.shape[1] - r0).zero_()  # PEFT's B = 0: the update unchanged
    if role == "shrunk":
        for module, (rank, scale) in branch_scales.items():
            a, b = _factor_names(params, module)
            s0 = trunk_scales[module][1]
            new_b, new_a = truncate(tensors[f"param.{b}"], tensors[f"param.{a}"], s0, scale, rank)
            params[a].copy_(new_a)
            params[b].copy_(new_b)


def _check_factor(name, p, saved, dim: int, rank: int, trunk_rank: int) -> None:
    other = 1 - dim
    if (
        p.shape[dim] != rank
        or saved.shape[dim] != trunk_rank
        or p.shape[other] != saved.shape[other]
    ):
        raise ConfigError(
            f"--branch-at: cannot grow or truncate {name} (shape {tuple(saved.shape)} -> "
            f"{tuple(p.shape)}): only LoRA factors with the rank on one axis branch "
            "(not --target-parameters' stacked experts)"
        )


def _factor_names(params: dict, module: str) -> tuple[str, str]:
    a = next(n for n in params if _module(n) == module and _rank_dim(n) == 0)
    b = next(n for n in params if _module(n) == module and _rank_dim(n) == 1)
    return a, b


def truncate(b0: torch.Tensor, a0: torch.Tensor, s0: float, s1: float, rank: int):
    """(B', A') of rank ``rank`` with s1·B'A' the best rank-``rank`` approximation of
    s0·B0·A0 (Eckart-Young), from an SVD of the r0 × r0 core of QR factors, in float64.

    >>> b, a = torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    >>> nb, na = truncate(b, a, 2.0, 4.0, 2)
    >>> u, s, vh = torch.linalg.svd(2.0 * b @ a)
    >>> torch.allclose(4.0 * nb @ na, u[:, :2] @ torch.diag(s[:2]) @ vh[:2])
    True
    """
    qb, rb = torch.linalg.qr(b0.double())  # B0 = Qb Rb
    qa, ra = torch.linalg.qr(a0.double().T)  # A0ᵀ = Qa Ra, so A0 = Raᵀ Qaᵀ
    u, s, vh = torch.linalg.svd(s0 * rb @ ra.T)
    root = (s[:rank] / s1).sqrt()
    new_b = (qb @ u[:, :rank]) * root
    new_a = root[:, None] * (vh[:rank] @ qa.T)
    return new_b.to(b0.dtype), new_a.to(a0.dtype)


def _optimizer_state(optimizer, names: list[str], tensors: dict, scales: dict) -> dict:
    """The trunk's AdamW state laid onto the branch's parameters: each LoRA factor's moments
    divided by c (first) and c² (second moments), padded with zeros for new components."""
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, what, name = key.split(".", 2)
            saved.setdefault(name, {})[what] = value
    state = {}
    for index, name in enumerate(names):
        entry = saved.get(name)
        if not entry:
            continue
        dim = _rank_dim(name)
        p = optimizer.param_groups[0]["params"][index]
        for what, value in entry.items():
            if dim is None or value.dim() == 0:
                continue
            power = 2 if what.endswith("exp_avg_sq") else 1
            value = value / scales[_module(name)] ** power
            pad = list(p.shape)
            pad[dim] -= value.shape[dim]
            entry[what] = torch.cat([value, value.new_zeros(pad)], dim=dim)
        state[index] = entry
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def _kept_lambdas(scheduler) -> dict:
    """A LambdaLR's own ``lr_lambdas`` entry (its functions are code, not state)."""
    current = scheduler.state_dict()
    return {"lr_lambdas": current["lr_lambdas"]} if "lr_lambdas" in current else {}
