"""``--branch-at F``: which trial of a seed's rank curve is its trunk, which ones branch from
it, and where a branch (or a branch run again after a crash) starts. No torch.

Curves of different ranks coincide early and part late ("LoRA Without Regret", 2025; the
stability pools), so the first share F of a trial is nearly the same work at every rank.
With ``--branch-at`` the first trial of each seed on the rank curve, the *trunk*, saves its
whole training state after optimizer step ``t = round(F * max_steps)``
(:meth:`~rankwise.storage.rundir.RunDir.trunk_checkpoint`); every later trial of that seed
starts from that state and trains steps ``t+1 .. max_steps`` of the same schedule on the
same data order (:mod:`rankwise.training.branch` grows or truncates the adapter). A branch
costs ``1 - F`` of a trial.

The rules, all read from the run directory, so a resumed search plans exactly the specs the
interrupted one did:

- Only trials of the rank curve branch (kind ``main``, no variant group): the learning-rate
  calibration, co-tuning, other target sets and the stages after the curve train in full.
- A seed's trunk is its first trial the search runs (the ladder's start rank; for a seed
  that racing adds, the first rank raced with it). A trunk that never reaches step ``t``
  (failed, stopped early) saves nothing, and the next trial of its seed becomes the trunk.
- A parallel search (``--executor ray``) runs a trunk only when the strategy asks for it,
  never ahead; branches run ahead once their trunk's state is saved.
- A trunk run again after ``kill -9`` is the trunk again (its saved state names it) and
  saves again; a branch run again starts again from the trunk's state: its spec is the same.
- **Every seed has a trunk of its own**; a branch never starts from another seed's trunk.
  The seeds of a rank then differ in their whole path (adapter init and data order from
  step 0), as fresh trials do, so the seed-to-seed spread that racing and the noise
  estimate read is the spread of whole trials. Branching seed 1 from seed 0's trunk with
  another data order after ``t`` would share the first ``t`` steps between the seeds and
  shrink that spread, so the search would call differences significant that are not
  (bench/branch.py measures the branches' spread against fresh trials').

Example (the trunk r4-s0 has saved its state at step 50 of 100):
    >>> import json, tempfile
    >>> from rankwise.records import LoraSpec, TrainSpec, TrialSpec
    >>> d = RunDir(tempfile.mkdtemp())
    >>> spec = lambda r, s: TrialSpec(key=f"r{r}-s{s}", rank=r, seed=s, lora=LoraSpec(r, 8),
    ...                               train=TrainSpec(max_steps=100), model={}, data_dir="")
    >>> plan(spec(4, 0), d, 0.5).branch.role
    'trunk'
    >>> folder = d.trunk_checkpoint("r4-s0")  # what rankwise.training.branch writes there
    >>> folder.mkdir(parents=True)
    >>> meta = {"seed": 0, "group": "", "branch": dataclasses.asdict(plan(spec(4, 0), d, 0.5).branch)}
    >>> _ = (folder / TRUNK_META).write_text(json.dumps(meta))
    >>> [plan(spec(r, 0), d, 0.5).branch.role for r in (2, 4, 8)]
    ['shrunk', 'trunk', 'grown']
    >>> plan(spec(8, 0), d, 0.5).branch.describe()
    'branch of r4-s0 @ step 50 (grown from r=4)'
    >>> plan(spec(8, 1), d, 0.5).branch.role  # seed 1 has no trunk yet: this is its trunk
    'trunk'
"""

from __future__ import annotations

import dataclasses
import json

from rankwise.records import Branch, TrialKind, TrialResult, TrialSpec
from rankwise.storage.rundir import TRUNK_DIR, TRUNK_META, RunDir

__all__ = ["branch_step", "branches", "plan", "saved_trunk"]


def branch_step(share: float, max_steps: int) -> int | None:
    """The optimizer step after which the trunk's state is saved: ``round(F * max_steps)``,
    or None when that leaves no step before or after it (nothing to share or to branch).

    >>> branch_step(0.25, 500), branch_step(0.5, 6), branch_step(0.5, 1)
    (125, 3, None)
    """
    step = round(share * max_steps)
    return step if 1 <= step < max_steps else None


def branches_here(spec: TrialSpec) -> bool:
    """Whether ``spec`` is a trial of the rank curve (the only ones that branch)."""
    return spec.kind == TrialKind.MAIN and not spec.group


def saved_trunk(run_dir: RunDir, seed: int) -> Branch | None:
    """The trunk whose state is saved for ``seed``'s curve, or None (none has reached its
    branch step yet). Its ``checkpoint`` is this run directory's folder for it, wherever
    the directory was when it was written."""
    found = []
    for meta_file in run_dir.trials.glob(f"*/{TRUNK_DIR}/{TRUNK_META}"):
        try:
            meta = json.loads(meta_file.read_text())
            trunk = Branch(**meta["branch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a state this rankwise wrote: never branch from it
        if meta.get("seed") == seed and not meta.get("group"):
            found.append(dataclasses.replace(trunk, checkpoint=str(meta_file.parent)))
    # One per seed (its later trials branch instead of saving); sorted for a stable answer.
    return min(found, key=lambda b: b.trunk) if found else None


def plan(spec: TrialSpec, run_dir: RunDir, share: float | None) -> TrialSpec:
    """``spec`` as a trunk (it saves its state) or a branch (it starts from its seed's
    trunk), or unchanged (no ``--branch-at``, not on the curve, too few steps)."""
    if share is None or not branches_here(spec):
        return spec
    step = branch_step(share, spec.train.max_steps)
    if step is None:
        return spec
    trunk = saved_trunk(run_dir, spec.seed)
    if trunk is None or trunk.trunk == spec.key:
        folder = str(run_dir.trunk_checkpoint(spec.key))
        return spec.replace(branch=Branch(spec.key, step, "trunk", spec.rank, folder))
    role = (
        "grown"
        if spec.rank > trunk.trunk_rank
        else "shrunk"
        if spec.rank < trunk.trunk_rank
        else "continued"
    )
    return spec.replace(branch=dataclasses.replace(trunk, role=role))


def branches(trials: list[TrialResult]) -> list[dict]:
    """What ``recommendation.json`` says of every branched trial: its trunk and step."""
    return [
        {
            "key": t.key,
            "rank": t.rank,
            "seed": t.seed,
            "trunk": t.branch.trunk,
            "trunk_rank": t.branch.trunk_rank,
            "step": t.branch.step,
            "how": t.branch.role,
        }
        for t in trials
        if t.branch is not None and not t.branch.is_trunk
    ]
