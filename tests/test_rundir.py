"""The run directory: one search at a time (a file lock), a stale lock taken over, an
identity that sees every option and the data itself, every path of its layout, and a store
that cannot be read (refused, or started again with --force)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rankwise.cli import main
from rankwise.run.ray_executor import _take_files, _write_files
from rankwise.storage.rundir import RunDir
from rankwise.storage.store import RunStore, UnreadableStore

from .conftest import search_argv


def _spawn(argv, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "rankwise.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        **kw,
    )


def _wait_for(predicate, seconds=60.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _owner(out):
    try:
        return json.loads((out / ".rankwise.owner.json").read_text())
    except (OSError, ValueError):
        return None


def _trials_started(out) -> bool:
    if not (out / "trials.sqlite").exists():
        return False
    try:  # the search may have created the file but not yet its tables
        store = RunStore(out, readonly=True)
    except Exception:
        return False
    try:
        return bool(store.running() or store.results())
    except Exception:
        return False
    finally:
        store.close()


def test_second_search_on_a_live_directory_is_refused(tmp_path, llama_dir, text_jsonl, capsys):
    out = tmp_path / "run"
    argv = search_argv(llama_dir, text_jsonl, out, ranks="1,2", max_steps=150, eval_every=50)
    first = _spawn(argv)
    try:
        assert _wait_for(lambda: _trials_started(out)), first.stderr.read() if first.poll() else ""
        capsys.readouterr()
        for extra in ([], ["--force"]):  # --force must not delete folders under a live run
            assert main(argv + extra) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Traceback" not in err
            assert f"{out} is in use by pid {first.pid} (started " in err
            assert "wait for it or use another --out" in err
        assert main(["show", str(out)]) == 0  # a live run can still be read
        assert first.wait(timeout=300) == 0, first.stderr.read()
    finally:
        first.kill()
    store = RunStore(out, readonly=True)
    trials = [r for r in store.results() if r.kind == "main"]
    assert sorted(r.rank for r in trials) == [1, 2] and not store.running()
    assert (out / "adapter" / "adapter_config.json").exists() and _owner(out) is None


def test_lock_left_by_kill_9_is_taken_over(tmp_path, llama_dir, text_jsonl):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from rankwise.storage.rundir import RunDir\n"
            f"with RunDir({str(out)!r}).locked():\n    print('locked', flush=True); time.sleep(600)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        dead = _owner(out)["pid"]
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        holder.kill()
    assert _owner(out)["pid"] == dead  # the dead process's record is still there
    proc = _spawn(search_argv(llama_dir, text_jsonl, out, ranks="1"))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"took over the lock of pid {dead}" in err
    assert (out / "recommendation.json").exists() and _owner(out) is None


def test_edited_training_file_is_refused_on_resume(tmp_path, llama_dir, text_jsonl, capsys):
    out = tmp_path / "run"
    argv = search_argv(llama_dir, text_jsonl, out, ranks="1")
    assert main(argv) == 0
    before = [r for r in RunStore(out, readonly=True).results() if r.kind == "main"]
    assert main(argv) == 0  # unchanged: resumes, trains nothing new
    assert [r for r in RunStore(out, readonly=True).results() if r.kind == "main"] == before
    rec = (out / "recommendation.json").read_text()
    lines = text_jsonl.read_text().splitlines()
    text_jsonl.write_text("\n".join(lines[:-10] + [json.dumps({"text": "new words here"})] * 10))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data_sha256:" in err and "--force" in err
    kept = [r for r in RunStore(out, readonly=True).results() if r.kind == "main"]
    assert kept == before  # nothing recorded was lost
    assert (out / "recommendation.json").read_text() == rec
    assert main(argv + ["--force"]) == 0
    after = [r for r in RunStore(out, readonly=True).results() if r.kind == "main"]
    assert len(after) == 1 and after[0].best_val_loss != before[0].best_val_loss


def test_a_changed_option_is_listed_on_resume(tmp_path, llama_dir, text_jsonl, capsys):
    out = tmp_path / "run"
    assert main(search_argv(llama_dir, text_jsonl, out, ranks="1")) == 0
    capsys.readouterr()
    assert main(search_argv(llama_dir, text_jsonl, out, ranks="1", warmup_steps=2)) == 2
    err = capsys.readouterr().err
    assert "warmup_steps: 0 -> 2" in err and err.count("\n") == 1


# -- the layout, and a store that cannot be read ---------------------------------------------
def test_every_path_of_the_run_directory_comes_from_rundir(tmp_path):
    d = RunDir(tmp_path)
    layout = [
        (d.store, "trials.sqlite"),
        (d.data, "data"),
        (d.tokens, "data/tokens.safetensors"),
        (d.trials, "trials"),
        (d.trial_adapter("r4-s0"), "trials/r4-s0/adapter"),
        (d.trial_adapter("lr-0.001/r4-s0"), "trials/lr-0.001_r4-s0/adapter"),
        (d.adapter, "adapter"),
        (d.recommendation, "recommendation.json"),
        (d.summary, "summary.md"),
        (d.report, "report.html"),
    ]
    assert [p.relative_to(tmp_path).as_posix() for p, _ in layout] == [w for _, w in layout]
    # The way back from a trial's adapter folder (a TrialSpec's adapter_dir, on a worker or
    # in a nested run) to its run directory, and to a sibling trial's folder.
    adapter = d.trial_adapter("g/r4-s0")
    assert RunDir.of_adapter(str(adapter)).path == tmp_path
    assert RunDir.of_adapter(adapter).trial_adapter("g/nested-r2-s0") == d.trial_adapter(
        "g/nested-r2-s0"
    )
    with pytest.raises(ValueError, match="not a trial adapter folder"):
        RunDir.of_adapter(tmp_path / "adapter")


def test_a_ray_workers_adapter_comes_back_to_the_drivers_trial_folder(tmp_path):
    """Without a shared disk a worker trains into its own folder; the files it sends back
    land where the driver's spec said (what --executor ray does around a trial)."""
    driver, worker = RunDir(tmp_path / "driver"), RunDir(tmp_path / "worker")
    adapter_dir = driver.trial_adapter("lr-0.001/r4-s0")
    local = worker.relocate(adapter_dir)
    assert local == worker.trial_adapter("lr-0.001/r4-s0")
    local.mkdir(parents=True)
    (local / "adapter_config.json").write_text('{"r": 4}')
    _write_files(RunDir.of_adapter(adapter_dir).trials, _take_files(worker.trials))
    assert (adapter_dir / "adapter_config.json").read_text() == '{"r": 4}'
    assert not worker.trials.exists()


def _unreadable_run(tmp_path) -> RunDir:
    d = RunDir(tmp_path / "run")
    d.path.mkdir()
    d.store.write_text("not a database\n")
    for path in (d.summary, d.trial_adapter("r1-s0") / "adapter_config.json", d.tokens):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name)
    return d


def test_an_unreadable_store_is_refused_naming_force_and_kept(tmp_path):
    d = _unreadable_run(tmp_path)
    before = {p: p.read_bytes() for p in d.path.rglob("*") if p.is_file()}
    hint = "restore it from a backup, or pass --force to start the run again"
    with pytest.raises(UnreadableStore, match=f"file is not a database\\); {hint}$"):
        d.check_identity({"lr": 1})
    with pytest.raises(UnreadableStore, match=f"file is not a database\\); {hint}$"):
        d.open_store()
    assert {p: p.read_bytes() for p in d.path.rglob("*") if p.is_file()} == before


def test_force_replaces_an_unreadable_store_and_its_outputs_but_keeps_the_tokens(tmp_path):
    d = _unreadable_run(tmp_path)
    store = d.open_store(force=True)
    assert store.results() == [] and store.get_meta("identity") is None
    assert not d.summary.exists() and not d.trials.exists()
    assert d.tokens.read_text() == "tokens.safetensors"  # checked by its own fingerprint
    left = {p.name for p in d.path.iterdir()} - {"trials.sqlite-wal", "trials.sqlite-shm"}
    assert left == {"data", "trials.sqlite"}
    store.close()


def test_write_json_takes_a_name_or_a_path_of_a_relative_run_dir(tmp_path, monkeypatch):
    """``--out runs/x`` is relative: its recommendation path must not be joined twice."""
    monkeypatch.chdir(tmp_path)
    d = RunDir("runs/x")
    d.path.mkdir(parents=True)
    assert d.write_json(d.recommendation, {"rank": 4}) == d.recommendation
    assert d.write_json("other.json", {}) == d.path / "other.json"
    assert json.loads((tmp_path / "runs/x/recommendation.json").read_text()) == {"rank": 4}
