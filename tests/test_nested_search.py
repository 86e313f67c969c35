"""`--strategy nested` through the Study: records, show/report, final trial, --no-final."""

from __future__ import annotations

import json

from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.cli import main
from rankwise.training.evaluate import evaluate

from .conftest import fast_args


def run(llama_dir, text_jsonl, out, **over):
    return rankwise.search(
        model=str(llama_dir),
        train=str(text_jsonl),
        out=str(out),
        strategy="nested",
        ranks=[1, 2, 4, 8],
        **fast_args(**over),
    )


def test_nested_search_with_final_trial(tmp_path, llama_dir, text_jsonl, capsys):
    out = tmp_path / "run"
    result = run(llama_dir, text_jsonl, out)
    assert [t.key for t in result.trials] == [f"nested-r{r}-s0" for r in (1, 2, 4, 8)]
    assert all(t.extra["nested"] for t in result.trials)
    assert sum(t.train_tokens for t in result.trials) == 6 * 4 * 32  # one training run
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["final"]["rank"] == rec["rank"] and rec["final"]["status"] == "complete"
    assert "nested run" in rec["stop_reason"]
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == rec["rank"]
    capsys.readouterr()
    assert main(["show", str(out)]) == 0 and "final" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0 and (out / "report.html").exists()
    again = run(llama_dir, text_jsonl, out)  # resume: nothing retrained
    assert [t.wall_seconds for t in again.trials] == [t.wall_seconds for t in result.trials]


def test_no_final_delivers_the_truncated_nested_adapter(tmp_path, llama_dir, text_jsonl):
    out = tmp_path / "run"
    result = run(llama_dir, text_jsonl, out, final=False, max_rank=4)
    statuses = {t.rank: t.status for t in result.trials}
    assert statuses == {1: "complete", 2: "complete", 4: "complete", 8: "skipped"}
    rec = json.loads((out / "recommendation.json").read_text())
    assert "final" not in rec
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir), str(out / "adapter")
    )
    assert model.peft_config["default"].r == rec["rank"]
    tokens = load_file(str(out / "data" / "tokens.safetensors"))
    loss = evaluate(model, tokens["val_ids"], tokens["val_labels"], 4, "cpu")
    assert abs(loss - rec["loss"]) < 1e-4
