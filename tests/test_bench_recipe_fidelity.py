"""bench/recipe_fidelity.py: its smoke mode (every variant's grid search on a tiny planted
task), what each variant's trials recorded, the resume (a finished variant is not searched
again), and its table, rendered from the results JSON alone."""

from __future__ import annotations

import json

from bench import planted
from bench import recipe_fidelity as rf


def test_smoke_searches_every_variant_records_it_and_resumes(bench_main, tmp_path):
    out = bench_main(rf, "--root", str(tmp_path))
    doc = json.loads((tmp_path / "results" / "recipe_fidelity.json").read_text())
    assert (tmp_path / "results" / "recipe_fidelity.md").read_text() == rf.render(doc)
    assert doc["environment"]["cpu"] and doc["environment"]["torch"]
    rows = {row["variant"]: row for row in doc["results"]}
    assert list(rows) == list(rf.PLANTED_VARIANTS)
    for variant, row in rows.items():
        asked = rf.VARIANTS[variant]
        assert row["recorded"]["lr_scheduler"] == asked.get("lr_scheduler", "linear")
        assert row["recorded"]["use_dora"] == asked.get("use_dora", False)
        assert row["recorded"]["neftune_alpha"] == asked.get("neftune_alpha")
        assert row["recorded"]["target_modules"] == asked.get(
            "target_modules", list(planted.TARGETS)
        )
        assert set(row["curve"]) == {"1", "2"} and row["trials"] == 2
        assert row["answer"] is None or row["curve"][str(row["answer"])] == row["answer_loss"]
    for variant in ("linear", "cosine", "neftune", "lora-qvu", "dora-qvu"):
        assert rows[variant]["answer"] in (1, 2) and not rows[variant]["failed"]
    assert "| planted-k2-smoke (k=2) | cosine schedule |" in out

    again = bench_main(rf, "--root", str(tmp_path))  # every variant is read back, not searched
    assert again.count("done before") == len(rf.PLANTED_VARIANTS)
    redo = json.loads((tmp_path / "results" / "recipe_fidelity.json").read_text())
    assert redo["results"] == doc["results"]


def row(variant: str, answer, curve: dict, failed=None) -> dict:
    loss = curve.get(str(answer))
    return {"task": "t", "k": 4, "variant": variant, "ranks": [1, 2, 4], "answer": answer,
            "answer_loss": loss, "undecided": "", "base_loss": 4.0, "curve": curve,
            "failed": failed or {}, "wall_seconds": 150.0}  # fmt: skip


def test_render_needs_only_the_json():
    doc = {"environment": {"date": "d", "cpu": "c"}, "results": [
        row("linear", 4, {"1": 3.9, "2": 3.8, "4": 3.7}),
        row("cosine", 2, {"1": 3.85, "2": 3.75, "4": 3.74}),
        row("dora", None, {"1": None, "2": None, "4": None}, {"1": "unstable: nan"}),
        row("lora-qvu", 4, {"1": 3.9, "2": 3.8, "4": 3.72}),
        row("dora-qvu", 2, {"1": 3.9, "2": 3.7, "4": 3.69}),
    ]}  # fmt: skip
    table = rf.render(json.loads(json.dumps(doc)))
    assert "| t (k=4) | linear, LoRA, no noise (default) | r=4 | 3.7000 | - | 4.0000 | " in table
    assert "| 3.9000 | 3.8000 | **3.7000** | 2.5 min |" in table
    assert "| cosine schedule | r=2 | 3.7500 | +0.0500 |" in table  # against the default
    assert "| DoRA | none | - | - |" in table
    assert "| DoRA on q/v/up (no down_proj) | r=2 | 3.7000 | -0.0200 |" in table  # vs LoRA q/v/up
    assert "Failed trials: t, DoRA: r=1 unstable: nan." in table
    assert rf.failures({"1": "nan", "2": "nan", "4": "oom"}) == "r=1, 2 nan; r=4 oom"
    assert rf.render({"results": []}) == "(no variant measured yet)\n"
