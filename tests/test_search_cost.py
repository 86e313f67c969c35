"""What makes a search cheaper: early stopping, warm starts, the shared nested scale and
a final trial that starts from the nested run's truncation."""

from __future__ import annotations

import json

import pytest
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import rankwise
from rankwise.config import Options
from rankwise.errors import ConfigError
from rankwise.report.progress import trial_line
from rankwise.training.evaluate import evaluate
from rankwise.training.trial import run_trial

from .conftest import fast_args, make_spec

# Twelve steps, an evaluation every three: room for early stopping to end a trial.
TWELVE = {"max_steps": 12, "eval_every": 3}


@pytest.fixture
def ctx(tiny_ctx):
    return tiny_ctx


def test_early_stopping_ends_a_trial_that_stopped_improving(ctx):
    # A rate too small to move the loss by the threshold: the first evaluation is the best,
    # the next one spends the patience.
    r = run_trial(
        make_spec(**TWELVE, lr=1e-9, early_stopping_patience=1, early_stopping_threshold=1e-3),
        ctx,
    )
    assert r.ok and r.early_stopped
    assert r.steps == 6 and [s for s, _ in r.val_curve] == [3, 6]
    assert r.train_tokens == 6 * 4 * 16
    assert "early stopped at step 6" in trial_line(r)
    # Without the threshold the same run trains every step (each evaluation is a new best).
    full = run_trial(make_spec(**TWELVE, early_stopping_patience=1), ctx)
    assert not full.early_stopped and full.steps == 12


def test_a_warm_start_begins_where_the_adapter_ended(ctx, tmp_path):
    first = run_trial(make_spec(key="a", adapter_dir=tmp_path / "a"), ctx)
    assert first.ok
    # One step at a vanishing rate: the val loss is the saved adapter's, not a fresh one's.
    warm = run_trial(
        make_spec(key="b", max_steps=1, lr=1e-12, init_adapter=str(tmp_path / "a")), ctx
    )
    fresh = run_trial(make_spec(key="c", max_steps=1, lr=1e-12), ctx)
    assert warm.best_val_loss == pytest.approx(first.best_val_loss, abs=1e-6)
    assert abs(fresh.best_val_loss - first.best_val_loss) > 1e-3


def test_a_warm_start_from_a_folder_without_an_adapter_is_refused(ctx, tmp_path):
    with pytest.raises(ConfigError, match="no adapter_model.safetensors"):
        run_trial(make_spec(init_adapter=str(tmp_path)), ctx)


def test_final_steps_and_scale_options_are_checked():
    with pytest.raises(ConfigError, match="--final-steps"):
        Options.from_flat({"model": "m", "train": "t", "final_steps": 1.5})
    with pytest.raises(ConfigError, match="--nested-scale"):
        Options.from_flat({"model": "m", "train": "t", "nested_scale": "wide"})
    with pytest.raises(ConfigError, match="--early-stopping-patience"):
        Options.from_flat({"model": "m", "train": "t", "early_stopping_patience": 0})


def test_shared_scale_and_a_warm_final_trial(tmp_path, llama_dir, text_jsonl):
    out = tmp_path / "run"
    result = rankwise.search(
        model=str(llama_dir),
        train=str(text_jsonl),
        out=str(out),
        strategy="nested",
        ranks=[1, 2, 4, 8],
        nested_scale="shared",
        final_init="nested",
        final_steps=0.5,
        alpha=8.0,
        **fast_args(),
    )
    # One scale for every truncation: the policy's at the middle rank 4 (alpha 8 / 4 = 2).
    assert {t.rank: t.lora_alpha for t in result.trials if t.kind == "nested"} == {
        1: 2,
        2: 4,
        4: 8,
        8: 16,
    }
    rec = json.loads((out / "recommendation.json").read_text())
    final = rec["final"]
    assert final["init"] == "nested" and final["steps"] == 3
    assert final["train_tokens"] == 3 * 4 * 32  # half of the 6 steps
    rank = rec["rank"]
    assert final["rank"] == rank
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == rank and cfg["lora_alpha"] == 2 * rank
    assert rec["lora_config"]["lora_alpha"] == 2 * rank
    # The delivered adapter reproduces the reported loss.
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(llama_dir), str(out / "adapter")
    )
    tokens = load_file(str(out / "data" / "tokens.safetensors"))
    loss = evaluate(model, tokens["val_ids"], tokens["val_labels"], 4, "cpu")
    delivered = min(final["final_val_loss"], final["nested_val_loss"])
    assert loss == pytest.approx(delivered, abs=1e-4)
