"""Branched trials (``--branch-at``): which spec is a trunk and which a branch (torch-free),
a branch continuing its trunk bit for bit, growing that leaves the update unchanged,
shrinking that truncates it, a whole search through the CLI, and a branch redone on resume."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3

import pytest

from rankwise.cli import main
from rankwise.core.strategies import Grid, Ladder
from rankwise.records import Branch, TrialKind, TrialResult
from rankwise.run import branching
from rankwise.run.parallel import drive_parallel
from rankwise.storage.rundir import TRUNK_META, RunDir
from rankwise.testing import FakePool, FakeRunner

from .conftest import check_error, make_spec, search_argv


# -- bookkeeping, no torch --------------------------------------------------------------------
def saved(run_dir: RunDir, spec) -> None:
    """What a trunk leaves when it reaches its branch step (the meta part of its state)."""
    folder = run_dir.trunk_checkpoint(spec.key)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"seed": spec.seed, "group": spec.group, "branch": dataclasses.asdict(spec.branch)}
    (folder / TRUNK_META).write_text(json.dumps(meta))


def spec(rank: int, seed: int = 0, **over):
    return make_spec(rank, seed=seed, max_steps=100, **over)


def test_the_first_trial_of_a_seed_is_its_trunk_and_the_others_branch(tmp_path):
    d = RunDir(tmp_path)
    trunk = branching.plan(spec(4), d, 0.25)
    assert trunk.branch == Branch("r4-s0", 25, "trunk", 4, str(d.trunk_checkpoint("r4-s0")))
    saved(d, trunk)
    got = {r: branching.plan(spec(r), d, 0.25).branch for r in (1, 4, 16)}
    assert [got[r].role for r in (1, 4, 16)] == ["shrunk", "trunk", "grown"]
    assert got[16] == dataclasses.replace(trunk.branch, role="grown")  # its trunk's state
    # Every seed has a trunk of its own: seed 1's first trial (any rank) is seed 1's trunk.
    assert branching.plan(spec(16, seed=1), d, 0.25).branch.role == "trunk"


def test_what_a_resumed_trial_starts_from(tmp_path):
    d = RunDir(tmp_path)
    trunk = branching.plan(spec(4), d, 0.5)
    # A trunk killed before its branch step saved nothing: run again, it is the trunk again.
    assert branching.plan(spec(4), d, 0.5) == trunk
    saved(d, trunk)
    # ... and after it: still the trunk (it saves again), not a branch of itself.
    assert branching.plan(spec(4), d, 0.5) == trunk
    # A branch run again has the same spec: it starts again from the trunk's state.
    assert branching.plan(spec(8), d, 0.5) == branching.plan(spec(8), d, 0.5)
    assert branching.plan(spec(8), d, 0.5).branch.checkpoint == trunk.branch.checkpoint


def test_a_trunk_that_never_reached_its_step_leaves_the_next_trial_as_trunk(tmp_path):
    d = RunDir(tmp_path)
    branching.plan(spec(4), d, 0.5)  # planned as the trunk, failed at step 10: nothing saved
    assert branching.plan(spec(8), d, 0.5).branch.role == "trunk"
    (d.trunk_checkpoint("r2-s0")).mkdir(parents=True)
    (d.trunk_checkpoint("r2-s0") / TRUNK_META).write_text("{not json")  # never branch from it
    assert branching.plan(spec(8), d, 0.5).branch.role == "trunk"


@pytest.mark.parametrize(
    "changes",
    [
        {"kind": TrialKind.CALIBRATION},
        {"kind": TrialKind.COTUNE, "group": "dropout-0.1"},
        {"kind": TrialKind.MAIN, "group": "attention"},
    ],
)
def test_only_the_rank_curve_branches(tmp_path, changes):
    s = spec(4).replace(**changes)
    assert branching.plan(s, RunDir(tmp_path), 0.5) == s


def test_no_branch_without_the_flag_or_without_steps_on_both_sides(tmp_path):
    d = RunDir(tmp_path)
    assert branching.plan(spec(4), d, None).branch is None
    assert branching.plan(make_spec(4, max_steps=1), d, 0.5).branch is None
    assert branching.branch_step(0.01, 10) is None and branching.branch_step(0.99, 10) is None


def test_recommendation_lists_branches_with_trunk_and_step():
    trunk = Branch("r4-s0", 50, "trunk", 4, "c")
    results = [
        TrialResult("r4-s0", 4, 0, "complete", branch=trunk),
        TrialResult("r8-s0", 8, 0, "complete", branch=dataclasses.replace(trunk, role="grown")),
        TrialResult("r2-s0", 2, 0, "complete"),
    ]
    assert branching.branches(results) == [
        {"key": "r8-s0", "rank": 8, "seed": 0, "trunk": "r4-s0", "trunk_rank": 4, "step": 50,
         "how": "grown"}
    ]  # fmt: skip
    again = TrialResult.from_json(results[1].to_json())
    assert again.branch == results[1].branch
    old = json.loads(results[2].to_json())
    del old["branch"]  # a store written before branching: reads, no branch
    assert TrialResult.from_json(json.dumps(old)).branch is None


class BranchingRunner(FakeRunner):
    """The fake runner, planning specs as the real one does."""

    def __init__(self, run_dir: RunDir):
        super().__init__()
        self.dir = run_dir

    def spec_for(self, rank, seed, variant=None):
        return branching.plan(spec(rank, seed), self.dir, 0.5)


def test_parallel_lookahead_never_runs_a_trunk_ahead(tmp_path):
    """Each seed's trunk is the first of its trials the strategy asks for, as sequentially;
    branches run ahead once their trunk's state exists."""
    d = RunDir(tmp_path)
    trunks = []

    def train(s):  # a trunk reaches its branch step and saves
        if s.branch.is_trunk:
            trunks.append(s.key)
            saved(d, s)
        return 1.0 / s.rank + 0.01 * s.seed

    runner = BranchingRunner(d)
    ladder = Ladder([1, 2, 4, 8, 16], start_rank=4, max_seeds=2, noise_seeds=2)
    drive_parallel(ladder, runner, pool=FakePool(slots=3, loss=train))
    assert trunks == ["r4-s0", "r4-s1"]
    speculative = [r.key for r in runner.recorded if r.extra.get("speculative")]
    assert speculative and not set(speculative) & set(trunks)
    sequential = Grid(ranks=[4, 1, 2])  # the grid's first rank is its trunk: r1
    drive_parallel(sequential, BranchingRunner(RunDir(tmp_path / "g")), pool=FakePool(2, train))
    assert "r1-s0" in trunks


# -- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--branch-at", "1"], ["--branch-at: expected a share of --max-steps in (0, 1), got 1"]),
        (["--branch-at", "0"], ["--branch-at: expected a share", "got 0"]),
        (["--branch-at", "-0.5"], ["--branch-at: expected a share", "got -0.5"]),
        (["--branch-at", "0.5", "--strategy", "nested"], ["--branch-at", "--strategy nested"]),
    ],
)
def test_bad_branch_at_is_one_line_exit_2(
    tmp_path, llama_dir, text_jsonl, capsys, extra, fragments
):
    out = tmp_path / "run"
    check_error(capsys, search_argv(llama_dir, text_jsonl, out, "1,2") + extra, *fragments)
    assert not out.exists()


# -- training: tiny model in-process ------------------------------------------------------------
def trunk_spec(tmp_path, rank=2, **over):
    s = make_spec(rank, max_steps=6, eval_every=2, **over)
    folder = str(RunDir(tmp_path).trunk_checkpoint(s.key))
    return s.replace(branch=Branch(s.key, 3, "trunk", rank, folder))


def branch_of(trunk, rank, key=None, **over):
    role = "grown" if rank > trunk.rank else "shrunk" if rank < trunk.rank else "continued"
    s = make_spec(rank, key=key, max_steps=6, eval_every=2, **over)
    return s.replace(branch=dataclasses.replace(trunk.branch, role=role))


@pytest.fixture(scope="module")
def trained(tiny_ctx, tmp_path_factory):
    """A trunk at r=2 with dropout (the RNG state matters), its state saved at step 3."""
    from rankwise.training.trial import run_trial

    trunk = trunk_spec(tmp_path_factory.mktemp("run"), lora_dropout=0.1)
    return trunk, run_trial(trunk, tiny_ctx)


def test_a_branch_at_the_trunks_rank_continues_it_bit_for_bit(tiny_ctx, trained):
    """The saved state is the whole state: adapter, moments, schedule, data order, RNG."""
    from rankwise.training.trial import run_trial

    trunk, first = trained
    assert first.ok and first.branch == trunk.branch
    again = run_trial(branch_of(trunk, 2, key="again", lora_dropout=0.1), tiny_ctx)
    assert again.branch.role == "continued" and again.steps == 6
    assert again.train_curve == first.train_curve[3:]  # the same steps 4..6, to the bit
    assert again.val_curve == first.val_curve[1:]  # evaluations at 4 and 6: its own
    assert again.train_tokens * 2 == first.train_tokens  # it trained half of the steps


def _delta(peft_model) -> dict:
    """scale·B·A of every adapted module, in float64."""
    from rankwise.training.branch import lora_scales

    out = {}
    for name, (_, scale) in lora_scales(peft_model).items():
        m = peft_model.get_submodule(name)
        out[name] = (
            scale * m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double()
        )
    return out


def _trunk_at_step(ctx, trunk):
    """The trunk's adapter at the branch step, attached: (its update, its logits)."""
    import torch

    from rankwise.training.adapter import attached
    from rankwise.training.branch import load_state

    tensors, _ = load_state(trunk.branch.checkpoint, trunk)
    x = ctx.data.val_ids[:2]
    with attached(ctx.model, trunk) as pm, torch.no_grad():
        named = dict(pm.named_parameters())
        for k, v in tensors.items():
            if k.startswith("param."):
                named[k.removeprefix("param.")].copy_(v)
        pm.eval()
        return _delta(pm), pm(x).logits


def _branched(ctx, branch):
    import torch

    from rankwise.training.adapter import attached
    from rankwise.training.branch import Branching
    from rankwise.training.hooks import Run

    with attached(ctx.model, branch) as pm, torch.no_grad():
        Branching(branch).attached(pm, Run(branch))
        pm.eval()
        a = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
        return _delta(pm), pm(ctx.data.val_ids[:2]).logits, a


@pytest.mark.parametrize("policy", ["fixed", "rslora"])
def test_growing_leaves_the_update_and_the_outputs_unchanged(tiny_ctx, tmp_path, policy):
    import torch

    from rankwise.training.trial import run_trial

    rslora = policy == "rslora"
    trunk = trunk_spec(tmp_path, use_rslora=rslora)
    assert run_trial(trunk, tiny_ctx).ok
    before, logits = _trunk_at_step(tiny_ctx, trunk)
    after, grown_logits, params = _branched(tiny_ctx, branch_of(trunk, 8, use_rslora=rslora))
    for name in before:
        # float32 factors times c: equal to the rounding of the largest entries
        scale = float(before[name].abs().max())
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=1e-6 * scale)
    torch.testing.assert_close(grown_logits, logits, rtol=1e-5, atol=1e-5)
    b = next(v for k, v in params.items() if ".lora_B." in k)
    a = next(v for k, v in params.items() if ".lora_A." in k)
    assert b[:, 2:].abs().max() == 0 and a[2:].abs().min() > 0  # new: B = 0, A as PEFT inits


def test_shrinking_truncates_the_update_by_svd(tiny_ctx, trained):
    import torch

    trunk, _ = trained
    before, _ = _trunk_at_step(tiny_ctx, trunk)
    after, _, _ = _branched(tiny_ctx, branch_of(trunk, 1, lora_dropout=0.1))
    for name, delta in before.items():
        u, s, vh = torch.linalg.svd(delta)
        torch.testing.assert_close(after[name], s[0] * u[:, :1] @ vh[:1], rtol=1e-5, atol=1e-7)


def test_grown_moments_are_carried_rescaled_and_zero_for_new_components(tiny_ctx, trained):
    import torch

    from rankwise.training.adapter import attached
    from rankwise.training.branch import Branching, load_state
    from rankwise.training.evaluate import _Batches
    from rankwise.training.hooks import Run
    from rankwise.training.schedule import Schedule

    trunk, _ = trained
    grown = branch_of(trunk, 4, lora_dropout=0.1)
    tensors, meta = load_state(trunk.branch.checkpoint, trunk)
    with attached(tiny_ctx.model, grown) as pm:
        hooks = Branching(grown)
        hooks.attached(pm, Run(grown))
        named = {n: p for n, p in pm.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(list(named.values()), lr=grown.train.lr)
        sched = Schedule(opt, grown.train)
        assert hooks.resume(pm, opt, sched, _Batches(24, 4, 0)) == 3
        assert opt.param_groups[0]["lr"] == meta["lr"][0]
        name = next(n for n in named if ".lora_A." in n)
        c = math.sqrt((8 / 2) / (8 / 4))  # fixed alpha 8: c = sqrt(s0/s1), s = alpha/r
        m = opt.state[named[name]]["exp_avg"]
        torch.testing.assert_close(m[:2], tensors[f"opt.exp_avg.{name}"] / c)
        assert m[2:].abs().max() == 0
        v = opt.state[named[name]]["exp_avg_sq"]
        torch.testing.assert_close(v[:2], tensors[f"opt.exp_avg_sq.{name}"] / c**2)


# -- a whole search through the CLI -------------------------------------------------------------
@pytest.fixture(scope="module")
def branched_run(tmp_path_factory, llama_dir):
    """A ladder over r = 1, 2, 4 from r=2 with two seeds at the start, --branch-at 0.5."""
    from .conftest import sentences

    root = tmp_path_factory.mktemp("branched")
    train = root / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": s}) for s in sentences(120)))
    out = root / "run"
    argv = search_argv(llama_dir, train, out, "1,2,4", start_rank=2, max_seeds=2, branch_at=0.5)
    with pytest.MonkeyPatch.context() as mp:  # conftest's autouse fixture is per test
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("RANKWISE_CACHE", str(tmp_path_factory.getbasetemp() / "rw-cache"))
        assert main(argv) == 0
    return out, argv


def test_search_records_branches_in_the_recommendation_and_show(branched_run, capsys):
    out, _ = branched_run
    rec = json.loads((out / "recommendation.json").read_text())
    store = sqlite3.connect(out / "trials.sqlite")
    rows = {k: TrialResult.from_json(r) for k, r in store.execute("SELECT key, result FROM trials")}
    curve = {k: r for k, r in rows.items() if r.kind == TrialKind.MAIN and r.ok}
    trunks = {k for k, r in curve.items() if r.branch and r.branch.is_trunk}
    assert trunks == {"r2-s0", "r2-s1"}  # every seed its own trunk: the start rank
    assert all((RunDir(out).trunk_checkpoint(k) / TRUNK_META).is_file() for k in trunks)
    listed = {b["key"]: b for b in rec["branches"]}
    assert listed and set(listed) == set(curve) - trunks
    for key, b in listed.items():
        assert b["trunk"] == f"r2-s{curve[key].seed}" and b["step"] == 3
        assert b["how"] == ("grown" if curve[key].rank > 2 else "shrunk")
        assert curve[key].train_tokens * 2 == curve[b["trunk"]].train_tokens
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    key = next(iter(listed))
    assert f"branch of {listed[key]['trunk']} @ step 3 ({listed[key]['how']} from r=2)" in shown


def test_a_branch_killed_mid_trial_is_redone_from_its_trunks_state(branched_run, tmp_path):
    """kill -9 leaves the branch's row 'running': the rerun discards it and trains it again
    from the trunk's saved state (the same bits), and nothing else."""
    import shutil

    src, argv = branched_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    argv = [str(out) if a == str(src) else a for a in argv]
    db = sqlite3.connect(out / "trials.sqlite")
    rows = dict(db.execute("SELECT key, result FROM trials WHERE status = 'complete'"))
    key = next(
        k for k, r in rows.items() if (b := TrialResult.from_json(r).branch) and not b.is_trunk
    )
    before = {k: f for k, f in db.execute("SELECT key, finished_at FROM trials")}
    with db:
        db.execute("UPDATE trials SET status = 'running', result = NULL WHERE key = ?", (key,))
    db.close()
    shutil.rmtree(RunDir(out).trial_adapter(key))
    assert main(argv) == 0
    db = sqlite3.connect(out / "trials.sqlite")
    after = {k: f for k, f in db.execute("SELECT key, finished_at FROM trials")}
    assert {k for k in after if after[k] != before[k]} == {key}  # only the branch retrained
    redone = TrialResult.from_json(
        db.execute("SELECT result FROM trials WHERE key = ?", (key,)).fetchone()[0]
    )
    first = TrialResult.from_json(rows[key])
    # The same trunk and step; its state is read from where the run directory is now.
    assert redone.branch == dataclasses.replace(first.branch, checkpoint=redone.branch.checkpoint)
    assert redone.branch.checkpoint == str(RunDir(out).trunk_checkpoint(first.branch.trunk))
    assert redone.val_curve == first.val_curve
    assert redone.best_val_loss == first.best_val_loss


# -- on Ray: workers that do not share the run directory ----------------------------------------
@pytest.mark.slow  # Ray's start and two workers loading the model: about a minute
def test_ray_workers_branch_from_the_trunks_state_as_the_local_search(
    tmp_path, llama_dir, text_jsonl
):
    """Joining by address, the trunk's state comes back with its result and goes out with
    each branch: the same trials and losses as in this process."""
    import logging

    import ray
    import torch

    from rankwise.storage.store import RunStore

    def trials(out):
        store = RunStore(out, readonly=True)
        try:
            return {r.key: r for r in store.results() if r.kind == TrialKind.MAIN}
        finally:
            store.close()

    args = dict(strategy="grid", branch_at=0.5)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker: the same kernels, the same sums
    try:
        assert main(search_argv(llama_dir, text_jsonl, tmp_path / "local", "1,2,4", **args)) == 0
    finally:
        torch.set_num_threads(threads)
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR, runtime_env={"env_vars": env})  # fmt: skip
    try:
        address = ray.get_runtime_context().gcs_address
        out = tmp_path / "ray"
        argv = search_argv(llama_dir, text_jsonl, out, "1,2,4", executor="ray",
                           ray_address=address, **args)  # fmt: skip
        assert main(argv) == 0
    finally:
        ray.shutdown()
    want, got = trials(tmp_path / "local"), trials(out)
    assert set(got) == set(want) == {"r1-s0", "r2-s0", "r4-s0"}
    for key, r in got.items():
        assert r.best_val_loss == want[key].best_val_loss and r.val_curve == want[key].val_curve
        assert r.branch.role == want[key].branch.role
        assert r.branch.checkpoint == str(RunDir(out).trunk_checkpoint("r1-s0"))
    assert (RunDir(out).trunk_checkpoint("r1-s0") / TRUNK_META).is_file()  # came back
    assert not RunDir(out).trunk_checkpoint("r2-s0").exists()  # a branch sent nothing back
