"""rankwise.run.executor: the parallel search decides as the sequential one; Ray workers give the
same trials bit for bit, survive a killed worker and a killed driver."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rankwise.config import ExecutorConfig
from rankwise.core.criteria import Criterion, recommend
from rankwise.core.strategies import Grid, Ladder
from rankwise.errors import ConfigError
from rankwise.records import COMPLETE, SKIPPED, TrialResult
from rankwise.run.parallel import drive_parallel, lookahead
from rankwise.run.ray_executor import _connect
from rankwise.testing import FakePool, FakeRunner

from .conftest import search_argv

RANKS = [1, 2, 4, 8, 16, 32, 64]


# -- the parallel search, torch-free ------------------------------------------------------------
def planted(knee: int, start_loss: float = 3.0):
    """A rank curve that falls by 10% per doubling up to ``knee``, then by 0.1%."""

    def loss(rank: int, seed: int) -> float:
        steps = [r for r in RANKS if 1 < r <= rank]
        value = start_loss
        for r in steps:
            value *= 0.9 if r <= knee else 0.999
        return value + 1e-4 * seed

    return loss


CURVES = {f"knee {k}": planted(k) for k in (1, 4, 16, 64)} | {
    "bumpy": lambda rank, seed: (
        {1: 3.0, 2: 2.5, 4: 2.6, 8: 2.2, 16: 2.19, 32: 2.1, 64: 2.1}[rank] + 0.01 * seed
    )
}
ORDERS = {
    "oldest first": lambda keys: keys[0],
    "newest first": lambda keys: keys[-1],
    "random": lambda keys, rng=random.Random(0): rng.choice(keys),
}


def sequential(strategy, loss, skip=lambda rank: None):
    """The plain ask/run/tell loop: the reference the parallel search must equal."""
    while (p := strategy.ask()) is not None:
        reason = skip(p.rank)
        status, value = (SKIPPED, None) if reason else (COMPLETE, loss(p.rank, p.seed))
        strategy.tell(
            TrialResult(
                f"r{p.rank}-s{p.seed}", p.rank, p.seed, status, reason or "", best_val_loss=value
            )
        )
    return strategy


def ladder(start: int = 4, seeds: int = 1) -> Ladder:
    return Ladder(ranks=RANKS, start_rank=start, tolerance=0.01, seeds=seeds)


@pytest.mark.parametrize("curve", list(CURVES))
@pytest.mark.parametrize("start", [1, 4, 16])
@pytest.mark.parametrize("slots", [1, 2, 3, 5])
@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("seeds", [1, 2])
def test_parallel_ladder_decides_as_the_sequential_one(curve, start, slots, order, seeds):
    loss = CURVES[curve]
    want = sequential(ladder(start, seeds), loss)
    runner = FakeRunner()
    pool = FakePool(slots, lambda spec: loss(spec.rank, spec.seed), ORDERS[order])
    got = drive_parallel(ladder(start, seeds), runner, pool=pool)

    assert [(r.rank, r.seed) for r in got.results] == [(r.rank, r.seed) for r in want.results]
    assert [r.best_val_loss for r in got.results] == [r.best_val_loss for r in want.results]
    assert got.stop_reason == want.stop_reason
    assert recommend(got.scores(), 0.01) == recommend(want.scores(), 0.01)
    told = {r.key for r in got.results}
    for key, row in runner.store.rows.items():  # every other trial is kept, marked
        assert row.extra.get("speculative", False) == (key not in told)
    assert pool.peak <= slots and not pool.running
    if slots == 1:
        assert set(runner.store.rows) == told  # nothing run ahead


def test_ladder_speculates_up_and_down():
    """Waiting on r=4 after r=2 with 2 more workers: r=8 (if it climbs) and r=1 (if r=4 is
    flat and it probes down)."""
    s = ladder(start=2)
    p = s.ask()
    s.tell(TrialResult("r2-s0", 2, 0, COMPLETE, best_val_loss=2.0))
    p = s.ask()
    assert p.rank == 4
    ahead = lookahead(s, p, known=lambda q: None, busy=lambda q: False, limit=2)
    assert {q.rank for q in ahead} == {8, 1}
    assert s.ask() is None and s.results[-1].rank == 2  # the real ladder is untouched


def test_grid_runs_every_worker_and_budget_skips_stay_with_the_driver():
    runner = FakeRunner(skip=lambda rank: "over --max-rank" if rank > 8 else None)
    pool = FakePool(3, lambda spec: 1.0 / spec.rank)
    grid = drive_parallel(Grid(ranks=RANKS), runner, pool=pool)
    assert [r.rank for r in grid.results] == RANKS
    assert pool.peak == 3
    assert set(pool.submitted) == {"r1-s0", "r2-s0", "r4-s0", "r8-s0"}  # skips never run
    assert [r.status for r in grid.results][4:] == [SKIPPED] * 3


def test_lost_worker_is_retried_once_then_recorded_failed():
    deaths = {"r2-s0": 1, "r4-s0": 2}

    def loss(spec):
        if deaths.get(spec.key, 0) > 0:
            deaths[spec.key] -= 1
            return None  # the worker died
        return 1.0 / spec.rank

    runner = FakeRunner()
    grid = drive_parallel(Grid(ranks=[1, 2, 4]), runner, pool=FakePool(2, loss))
    by_rank = {r.rank: r for r in grid.results}
    assert by_rank[2].status == COMPLETE
    assert [a["reason"] for a in by_rank[2].extra["attempts"]] == ["ActorDiedError: killed"]
    assert by_rank[4].status == "failed" and "worker lost 2 times" in by_rank[4].reason
    assert any("retrying on a fresh worker" in line for line in runner.progress.lines)


def test_unneeded_trials_still_running_are_stopped():
    """A flat curve: the ladder stops at r=2, while r=4 and r=8 (run ahead in case it
    climbs) are still running; they are stopped, not recorded."""
    runner = FakeRunner()
    pool = FakePool(3, lambda spec: 1.0)
    got = drive_parallel(ladder(start=1), runner, pool=pool)
    assert got.stop_reason.startswith("plateau: r=2")
    assert sorted(pool.cancelled) == ["r4-s0", "r8-s0"] and not pool.running
    assert set(runner.store.rows) == {"r1-s0", "r2-s0"}


def test_a_stored_speculative_trial_that_is_needed_on_resume_is_unmarked():
    runner = FakeRunner()
    runner.store.finish(
        TrialResult("r8-s0", 8, 0, COMPLETE, best_val_loss=0.1, extra={"speculative": True})
    )
    grid = drive_parallel(Grid(ranks=[4, 8]), runner, pool=FakePool(1, lambda spec: 1.0))
    assert "speculative" not in runner.store.rows["r8-s0"].extra
    assert "speculative" not in grid.results[1].extra


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--executor", "ray", "--trial-resources", "gpu"],
            "--trial-resources: expected key=value",
        ),
        (["--executor", "ray", "--trial-resources", "tpu=1"], "unknown resource 'tpu'"),
        (["--executor", "ray", "--trial-resources", "gpu=-1"], "gpu must be >= 0"),
        (["--executor", "ray", "--trial-resources", "gpu=1.5"], "gpu above 1 must be whole"),
        (["--workers", "2"], "--workers: needs --executor ray"),
        (["--executor", "ray", "--workers", "0"], "--workers: must be > 0"),
        (["--executor", "dask"], "invalid choice"),
    ],
)
def test_bad_executor_options_exit_2_with_one_line(flags, message, tmp_path, capsys):
    from rankwise.cli import main

    code = _exit_code(main, ["search", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


def _exit_code(main, argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return exc.code


def test_trial_resources_parse():
    cfg = ExecutorConfig(executor="ray", trial_resources="gpu=1, cpu=4", workers=3)
    assert cfg.trial_resources == {"gpu": 1.0, "cpu": 4.0}


def test_without_ray_installed_exit_2_says_how_to_install(monkeypatch, tmp_path, capsys, llama_dir):
    from rankwise.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    argv = search_argv(llama_dir, tmp_path / "t.txt", tmp_path / "run", executor="ray")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("pip install rankwise[ray]") and len(err.splitlines()) == 1, err


def test_unreachable_ray_address_is_one_line():
    class NotStarted:
        def is_initialized(self):
            return False

    with pytest.raises(ConfigError, match=r"^--ray-address: cannot reach 127.0.0.1:1 "):
        _connect(NotStarted(), "127.0.0.1:1")


# -- on Ray -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_session():
    import ray  # requirements/dev.txt installs it: the Ray executor is tested, not skipped

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level=logging.ERROR,
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from .conftest import sentences

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": s}) for s in sentences(120)))
    return path


def results(run: Path) -> dict[str, TrialResult]:
    from rankwise.storage.store import RunStore

    store = RunStore(run, readonly=True)
    try:
        return {r.key: r for r in store.results() if r.kind != "base"}  # base: driver-side
    finally:
        store.close()


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory, llama_dir, data):
    """The reference: a 4-rank grid in this process, one torch thread."""
    import torch

    from rankwise.cli import main

    out = tmp_path_factory.mktemp("local") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each Ray worker: the same kernels, the same sums
    try:
        assert main(search_argv(llama_dir, data, out, "1,2,4,8", strategy="grid")) == 0
    finally:
        torch.set_num_threads(threads)
    return results(out)


def test_ray_grid_gives_the_same_losses_bit_for_bit(
    ray_session, local_grid, llama_dir, data, tmp_path
):
    from rankwise.cli import main

    out = tmp_path / "run"
    argv = search_argv(llama_dir, data, out, "1,2,4,8", strategy="grid", executor="ray")
    assert main(argv) == 0
    got = results(out)
    assert set(got) == set(local_grid)
    for key, want in local_grid.items():
        assert got[key].best_val_loss == want.best_val_loss
        assert got[key].val_curve == want.val_curve
        assert got[key].train_curve == want.train_curve
        assert "speculative" not in got[key].extra
    assert {r.extra["worker"] for r in got.values()} == {"w0", "w1"}  # side by side
    assert len({r.extra["pid"] for r in got.values()}) == 2  # each worker loaded the model once
    assert (out / "adapter" / "adapter_config.json").exists()
    summary = (out / "summary.md").read_text()
    assert "| worker |" in summary


def test_ray_ladder_decides_as_the_sequential_one(
    ray_session, local_grid, llama_dir, data, tmp_path
):
    """Joining a cluster by address (the tokens go through the object store, the adapters
    come back with the results): the ladder's trials and answer are the sequential ones."""
    from rankwise.cli import main

    out = tmp_path / "run"
    address = ray_session.get_runtime_context().gcs_address
    argv = search_argv(llama_dir, data, out, "1,2,4,8", executor="ray", ray_address=address)
    assert main(argv) == 0
    doc = json.loads((out / "recommendation.json").read_text())
    base = doc["base_val_loss"]
    # The sequential reference is told the local grid's own records: their per-block
    # validation losses are the noise the real ladder weighs too.
    want = Ladder(ranks=[1, 2, 4, 8], start_rank=1, criterion=Criterion(), base_loss=base)
    while (p := want.ask()) is not None:
        want.tell(local_grid[f"r{p.rank}-s{p.seed}"])
    assert [t["rank"] for t in doc["trials"]] == [r.rank for r in want.results]
    assert doc["rank"] == recommend(want.scores(), Criterion(), base_loss=base).rank
    assert doc["stop_reason"] == want.stop_reason
    got = results(out)
    needed = {r.key for r in want.results}
    for key, r in got.items():
        assert r.best_val_loss == local_grid[key].best_val_loss
        assert bool(r.extra.get("speculative")) == (key not in needed)
        assert (out / "trials" / key / "adapter" / "adapter_config.json").exists()
    assert (out / "adapter" / "adapter_config.json").exists()


def test_bench_parallel_smoke(ray_session, bench_main, tmp_path):
    """bench/parallel.py --smoke on this module's Ray: the ladder on 2 workers, speculating
    on the next rank, decides as the local executor does and records the same losses. (The
    grid's equality is test_ray_grid_gives_the_same_losses_bit_for_bit's.)"""
    from bench import harness, parallel

    out = bench_main(parallel, "--strategies", "ladder", "--results", str(tmp_path))
    [row] = harness.read_results("parallel", tmp_path)["results"]
    local, par = row["local"], row["ray"]
    assert row["strategy"] == "ladder" and len(par["decided"]) >= 2  # it climbed a step
    # Same decisions and rank (the benchmark asserts them) and the same loss for every trial
    # both ran.
    assert par["decided"] == local["decided"] and par["rank"] == local["rank"]
    assert row["same_losses"] and all(par["losses"][k] == v for k, v in local["losses"].items())
    # Speculative trials are counted apart from the decided ones, with their tokens.
    assert (not par["speculative"]) == (par["extra_tokens"] == 0)
    assert parallel.table([row]) in out


def test_a_worker_killed_mid_trial_is_retried(ray_session, local_grid, llama_dir, data, tmp_path):
    from rankwise.cli import main

    out = tmp_path / "run"
    argv = search_argv(llama_dir, data, out, "1", strategy="grid", executor="ray", workers=1)
    search = threading.Thread(target=main, args=(argv,))
    search.start()
    actor = _wait_for(lambda: _named_actor(ray_session, out), 120)
    _wait_for(_running_a_trial, 120)  # the worker is in Worker.run: loading or training
    ray_session.kill(actor)
    search.join(timeout=180)
    (r,) = results(out).values()
    assert r.status == COMPLETE
    assert [a["status"] for a in r.extra["attempts"]] == ["failed"]
    assert "Actor" in r.extra["attempts"][0]["reason"]
    assert r.best_val_loss == local_grid["r1-s0"].best_val_loss  # the whole trial, redone
    assert r.val_curve == local_grid["r1-s0"].val_curve


def _named_actor(ray, run: Path):
    import hashlib

    namespace = "rankwise-" + hashlib.sha256(str(run.absolute()).encode()).hexdigest()[:12]
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == namespace:
            return ray.get_actor(entry["name"], namespace=namespace)
    return None


def _running_a_trial() -> bool:
    """A Ray worker process inside Worker.run (Ray titles it ray::Worker.run meanwhile)."""
    import psutil

    for p in psutil.process_iter(["cmdline"]):
        if "ray::Worker.run" in " ".join(p.info["cmdline"] or []):
            return True
    return False


def _wait_for(probe, timeout: float):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := probe():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def _finished(run: Path) -> list[tuple]:
    path = run / "trials.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return db.execute(
            "SELECT key, finished_at FROM trials WHERE status != 'running' AND key != 'base' "
            "ORDER BY seq"
        ).fetchall()
    except sqlite3.OperationalError:  # the table is not there yet
        return []
    finally:
        db.close()


def test_a_killed_driver_leaves_no_workers_and_the_rerun_resumes(
    ray_session, llama_dir, data, tmp_path
):
    import psutil

    from rankwise.cli import main

    out = tmp_path / "run"
    argv = search_argv(
        llama_dir,
        data,
        out,
        "1,2,4,8",
        strategy="grid",
        executor="ray",
        max_steps=40,
        eval_every=20,
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    code = "import sys; from rankwise.cli import main; sys.exit(main(sys.argv[1:]))"
    driver = subprocess.Popen([sys.executable, "-c", code, *argv], env=env)
    try:
        first = _wait_for(lambda: _finished(out), 240)
        family = {p: p.name() for p in psutil.Process(driver.pid).children(recursive=True)}
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait()
    # Everything the driver's Ray started (GCS, raylet, the workers) goes with it; Ray's
    # per-node agents leave on their own a minute later, once they give up on the dead GCS.
    rest = [p for p, name in family.items() if "Agent" not in name]
    assert any("Worker" in family[p] for p in rest)
    _, alive = psutil.wait_procs(rest, timeout=60)
    assert not alive, [family[p] for p in alive]  # no orphaned Ray, no orphaned workers

    assert main(argv) == 0  # the rerun (on this test's Ray) resumes
    after = dict(_finished(out))
    assert set(after) == {"r1-s0", "r2-s0", "r4-s0", "r8-s0"}
    for key, finished_at in first:
        assert after[key] == finished_at  # finished trials were kept, not redone
    assert all(r.status == COMPLETE for r in results(out).values())
