"""Co-tuning and target-set comparison end to end on a tiny model; stored and resumable."""

from __future__ import annotations

import json
import sqlite3

import pytest

import rankwise

from .conftest import fast_args


def run(llama_dir, text_jsonl, out, **over):
    return rankwise.search(
        model=str(llama_dir),
        train=str(text_jsonl),
        out=str(out),
        ranks=[1, 2, 4],
        start_rank=1,
        **fast_args(**over),
    )


def test_cotune_and_compare_targets(tmp_path, llama_dir, text_jsonl):
    out = tmp_path / "run"
    result = run(
        llama_dir, text_jsonl, out, tune=["dropout", "alpha"], compare_targets=["mlp", "all-linear"]
    )
    rec = json.loads((out / "recommendation.json").read_text())
    groups = {
        g
        for (g,) in sqlite3.connect(out / "trials.sqlite").execute(
            "SELECT DISTINCT grp FROM trials"
        )
    }
    assert {"", "targets=mlp", "targets=all-linear"} <= groups
    assert {
        "tune:dropout=0.05",
        "tune:dropout=0.1",
        "tune:alpha=2r",
        "tune:rslora alpha=16",
    } <= groups
    assert rec["targets"]["verdict"].startswith("best per trainable parameter")
    names = {row["targets"] for row in rec["targets"]["rows"]}
    assert names == {"as searched", "mlp", "all-linear"}
    assert rec["tuning"]["verdict"].startswith("co-tuning")
    assert result.to_lora_config().r == rec["rank"]
    assert (out / "adapter" / "adapter_config.json").exists()
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == rec["rank"]
    # resumable: nothing is trained again
    before = (
        sqlite3.connect(out / "trials.sqlite")
        .execute("SELECT key, finished_at FROM trials ORDER BY key")
        .fetchall()
    )
    run(
        llama_dir, text_jsonl, out, tune=["dropout", "alpha"], compare_targets=["mlp", "all-linear"]
    )
    after = (
        sqlite3.connect(out / "trials.sqlite")
        .execute("SELECT key, finished_at FROM trials ORDER BY key")
        .fetchall()
    )
    assert before == after


def test_lr_calibration_picks_and_records_a_rate(tmp_path, llama_dir, text_jsonl):
    out = tmp_path / "run"
    args = fast_args(max_steps=20, eval_every=5)  # 5-step calibration runs
    args.pop("lr")
    rankwise.search(
        model=str(llama_dir),
        train=str(text_jsonl),
        out=str(out),
        ranks=[1, 2],
        start_rank=1,
        lr_candidates=[1e-6, 3e-2, 30.0],
        **args,
    )
    conn = sqlite3.connect(out / "trials.sqlite")
    cal = json.loads(
        conn.execute("SELECT value FROM meta WHERE key='lr_calibration'").fetchone()[0]
    )
    assert cal["lr"] == 3e-2 and set(cal["losses"]) == {"1e-06", "0.03", "30"}
    assert cal["losses"]["0.03"] < min(cal["losses"]["1e-06"], cal["losses"]["30"])
    specs = [json.loads(s) for (s,) in conn.execute("SELECT spec FROM trials")]
    specs = [s for s in specs if s["kind"] == "main"]
    assert {s["train"]["lr"] for s in specs} == {3e-2}


def test_lr_calibration_at_both_ends_reports_both(tmp_path, llama_dir, text_jsonl):
    """Fixed alpha: the rate picked at the start rank and at the largest rank, both recorded."""
    out = tmp_path / "run"
    args = fast_args(max_steps=20, eval_every=5)  # 5-step calibration runs
    args.pop("lr")
    rankwise.search(
        model=str(llama_dir),
        train=str(text_jsonl),
        out=str(out),
        ranks=[1, 8],
        start_rank=1,
        lr_candidates=[1e-6, 3e-2, 30.0],
        lr_check_largest_rank=True,
        **args,
    )
    conn = sqlite3.connect(out / "trials.sqlite")
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    start, largest = (
        json.loads(meta["lr_calibration"]),
        json.loads(meta["lr_calibration_largest_rank"]),
    )
    assert (start["rank"], largest["rank"]) == (1, 8)
    assert start["lr"] == largest["lr"] == 3e-2


def test_ratio_policy_warns_and_is_carried_into_the_config(tmp_path, llama_dir, text_jsonl):
    out = tmp_path / "run"
    result = rankwise.search(
        model=str(llama_dir),
        train=str(text_jsonl),
        out=str(out),
        ranks=[1, 2],
        start_rank=1,
        alpha_policy="ratio",
        alpha_ratio=2,
        **fast_args(),
    )
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["alpha_policy"] == "ratio" and "larger learning rate" in rec["warnings"][0]
    assert rec["lora_config"]["lora_alpha"] == 2 * rec["rank"]
    assert {t.lora_alpha for t in result.trials} == {2.0, 4.0}


def test_lr_range_is_extended_past_an_edge_and_bracketed(tmp_path, llama_dir, text_jsonl):
    """Both candidates far too low: the best sits at the top edge, so rates beyond it are
    tried until the best is interior (or the extension limit); the bracket is recorded."""
    from rankwise.run.calibrate import MAX_LR_EXTENSIONS

    out = tmp_path / "run"
    args = fast_args(max_steps=20, eval_every=5)
    args.pop("lr")
    rankwise.search(
        model=str(llama_dir),
        train=str(text_jsonl),
        out=str(out),
        ranks=[1],
        start_rank=1,
        lr_candidates=[1e-5, 1e-4],
        **args,
    )
    rec = json.loads((out / "recommendation.json").read_text())["learning_rate"]
    assert rec["calibrated"] and rec["extended"][0] == pytest.approx(1e-3)
    assert all(lr > 1e-4 for lr in rec["extended"]) and rec["lr"] > 1e-4
    losses = {float(k): v for k, v in rec["losses"].items()}
    lo, hi = rec["bracket"]
    assert lo is not None and losses[lo] > losses[rec["lr"]]
    interior = hi is not None and losses[hi] > losses[rec["lr"]]
    assert interior or len(rec["extended"]) == MAX_LR_EXTENSIONS
