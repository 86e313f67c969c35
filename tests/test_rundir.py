"""The run directory through the CLI: one search at a time (a file lock), a stale lock
taken over, and an identity that sees every option and the data itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from rankwise.cli import main
from rankwise.run.store import RunStore

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
    store = RunStore(out, readonly=True)
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
            "import sys, time; from rankwise.run.rundir import RunDir\n"
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
