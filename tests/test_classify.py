"""Sequence classification: labelled data, the classifier head saved with the adapter and
restored on the base, accuracy / macro-F1 as the metric that chooses the rank, bad labels."""

from __future__ import annotations

import json

import pytest
import torch

from rankwise.cli import main
from rankwise.config import DataConfig, ModelConfig, Options
from rankwise.core.criteria import recommend
from rankwise.core.metrics import accuracy, macro_f1
from rankwise.core.scores import RankScore
from rankwise.errors import ConfigError
from rankwise.io.models import load_model
from rankwise.training.adapter import TrialContext
from rankwise.training.classify import IGNORE, encode, label_set, read_labelled
from rankwise.training.hooks import Hooks
from rankwise.training.lifecycle import run_lifecycle
from rankwise.training.trial import run_trial

from .conftest import make_spec
from .test_bad_input import check_error
from .test_lifecycle import FailAt, digest

LABELS = ["asyncio", "email", "xml"]


def classify_argv(model, train, out, *extra, ranks="1,4,16"):
    return [
        "search",
        "--model",
        str(model),
        "--train",
        str(train),
        "--out",
        str(out),
        "--task",
        "seq-cls",
        "--ranks",
        ranks,
        "--strategy",
        "grid",
        "--target-modules",
        "all-linear",
        "--max-steps",
        "40",
        "--batch-size",
        "8",
        "--seq-len",
        "64",
        "--eval-every",
        "10",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "0",
        "--val-fraction",
        "0.25",
        "--max-seeds",  # one seed per rank (racing: tests/test_noise.py)
        "1",
        "--quiet",
        *extra,
    ]


def test_seq_cls_search_through_the_cli_chooses_the_rank_by_accuracy(
    tmp_path, encoder_dir, topics_jsonl, capsys
):
    out = tmp_path / "run"
    assert main(classify_argv(encoder_dir, topics_jsonl, out, "--metric", "accuracy")) == 0
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["task"] == "seq-cls" and rec["metric"] == "accuracy" and rec["labels"] == LABELS
    assert rec["lora_config"]["task_type"] == "SEQ_CLS"
    trials = rec["trials"]
    assert [t["rank"] for t in trials] == [1, 4, 16] and all(
        t["status"] == "complete" for t in trials
    )
    # Each trial's score is its error 1 - accuracy at the checkpoint it delivers ...
    from rankwise.storage.store import RunStore

    results = [r for r in RunStore(out, readonly=True).results() if r.kind != "base"]
    for r in results:
        assert r.metric == "accuracy" and set(r.val_metrics) == {"loss", "accuracy", "f1"}
        assert r.best_val_loss == pytest.approx(1 - r.val_metrics["accuracy"])
        assert len(r.val_loss_curve) == len(r.val_curve) == 4
    # ... so the recommendation is the one accuracy makes, shown as accuracy.
    by_accuracy = [
        RankScore(r.rank, 1 - r.val_metrics["accuracy"], 0.0, 1, "complete") for r in results
    ]
    assert rec["rank"] == recommend(by_accuracy, 0.01).rank
    assert rec["metric_value"] == pytest.approx(
        max(r.val_metrics["accuracy"] for r in results if r.rank == rec["rank"])
    )
    assert rec["reason"].startswith(f"r={rec['rank']}: ") and "accuracy" in rec["reason"]
    assert max(r.val_metrics["accuracy"] for r in results) > 1 / len(LABELS)  # it learned
    # The head is trained and saved with the adapter (modules_to_save).
    from safetensors import safe_open

    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert "classifier" in config["modules_to_save"]
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        assert any(k.startswith("base_model.model.classifier.") for k in f.keys())
    # A worker that loads the base and the tokens from the run folder scores the same.
    store = RunStore(out, readonly=True)
    first = next(r for r in results if r.rank == 1)
    spec = store.spec(first.key).replace(adapter_dir=None)
    again = run_trial(spec, TrialContext.for_spec(spec))
    assert again.best_val_loss == first.best_val_loss and again.val_metrics == first.val_metrics
    # Resuming runs nothing again and says the same.
    assert main(classify_argv(encoder_dir, topics_jsonl, out, "--metric", "accuracy")) == 0
    assert json.loads((out / "recommendation.json").read_text())["rank"] == rec["rank"]
    # What users read: accuracy, higher is better.
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "| rank | status | accuracy |" in shown and "best accuracy" in shown
    assert (
        "labels**: asyncio, email, xml" in shown and "AutoModelForSequenceClassification" in shown
    )


def labelled_context(encoder_dir, topics_jsonl):
    cfg = DataConfig(train=str(topics_jsonl), seq_len=32, val_fraction=0.25)
    labelled = read_labelled(cfg)
    model, tokenizer, device = load_model(
        ModelConfig(model=str(encoder_dir), task="seq-cls"), labelled.labels
    )
    return TrialContext(model, tokenizer, device, encode(labelled, tokenizer, 32))


# A seq-cls trial: the encoder's attention projections, scored by accuracy.
SEQ_CLS = {
    "target_modules": ["query", "value"],
    "batch_size": 8,
    "metric": "accuracy",
    "model": {"task": "seq-cls"},
}


def test_base_is_bit_identical_across_seq_cls_trials(encoder_dir, topics_jsonl):
    """The classifier head is a trainable base module (modules_to_save): it moves during a
    trial, and the base gets it back bit for bit, also when a trial fails."""
    ctx = labelled_context(encoder_dir, topics_jsonl)
    before = digest(ctx.model)
    head = ctx.model.classifier.weight.detach().clone()
    moved = {}

    class Peek(Hooks):
        def evaluate(self, peft_model, run, c):
            trained = peft_model.base_model.model.classifier.modules_to_save["default"].weight
            moved["head"] = not torch.equal(trained, head)
            super().evaluate(peft_model, run, c)

    first = run_lifecycle(make_spec(**SEQ_CLS), ctx, Peek())[0]
    assert first.ok and moved["head"] and digest(ctx.model) == before
    failed = run_lifecycle(make_spec(2, **SEQ_CLS), ctx, FailAt(3))[0]
    assert failed.status == "failed" and digest(ctx.model) == before
    again = run_trial(make_spec(**SEQ_CLS), ctx)
    assert again.best_val_loss == first.best_val_loss and again.val_metrics == first.val_metrics


def test_a_new_head_is_the_same_on_every_load(encoder_dir, topics_jsonl):
    """A remote worker loading the base itself gets the head the search trained from."""
    a = labelled_context(encoder_dir, topics_jsonl).model.classifier.weight
    b = labelled_context(encoder_dir, topics_jsonl).model.classifier.weight
    assert torch.equal(a, b) and a.shape[0] == len(LABELS)


def test_estimate_counts_the_head_as_peft_does(encoder_dir, topics_jsonl):
    from peft import LoraConfig, get_peft_model

    from rankwise.analysis.estimate import estimate

    model = labelled_context(encoder_dir, topics_jsonl).model
    predicted = estimate(model, ranks=[4], target_modules=["all-linear"], baseline_bytes=0)[0]
    peft_model = get_peft_model(
        model, LoraConfig(r=4, target_modules="all-linear", task_type="SEQ_CLS")
    )
    assert predicted.trainable_params == peft_model.get_nb_trainable_parameters()[0]


def test_labels_strings_or_integers_and_padding(tmp_path, encoder_dir):
    rows = [{"text": "x" * (i % 7 + 1), "label": i % 3} for i in range(30)]
    path = tmp_path / "ints.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(train=str(path), seq_len=4, val_fraction=0.2)
    labelled = read_labelled(cfg)
    assert labelled.labels == [0, 1, 2]
    from rankwise.testing import make_tokenizer

    data = encode(labelled, make_tokenizer(), 4)
    assert data.train_ids.shape == (24, 4) and data.train_labels.shape == (24,)
    assert (data.train_ids == IGNORE).any() and data.info["truncated"] > 0
    assert label_set([{"label": "b"}, {"label": "a"}, {"label": "b"}], cfg, "f") == ["a", "b"]


def test_macro_f1_matches_its_definition():
    pred = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    true = torch.tensor([0, 1, 1, 1, 2, 0, 2])
    # per class F1 = 2 tp / (predicted + actual): 2/4, 4/5, 4/5
    assert macro_f1(pred, true) == pytest.approx((2 / 4 + 4 / 5 + 4 / 5) / 3)
    assert accuracy(pred, true) == pytest.approx(5 / 7)
    # a class never predicted nor present does not count (scikit-learn's macro average)
    assert macro_f1(torch.tensor([0, 3]), torch.tensor([0, 3])) == 1.0


@pytest.mark.parametrize(
    "extra, rows, fragments",
    [
        (
            ["--label-field", "topic"],
            None,
            ["--label-field topic", "record 1 has no field 'topic'"],
        ),
        ([], [{"text": "a", "label": 0.5}], ["--label-field label", "record 1", "0.5"]),
        ([], [{"text": "a", "label": "x"}] * 8, ["holds one label ('x')"]),
        (
            ["--metric", "accuracy", "--task", "causal-lm"],
            None,
            ["--metric accuracy", "--task seq-cls"],
        ),
        (["--strategy", "nested"], None, ["--strategy nested", "causal-lm only"]),
    ],
)
def test_bad_classification_input_is_one_line_exit_2(
    tmp_path, encoder_dir, topics_jsonl, capsys, extra, rows, fragments
):
    train = topics_jsonl
    if rows is not None:
        train = tmp_path / "bad.jsonl"
        train.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    check_error(capsys, classify_argv(encoder_dir, train, out, *extra), *fragments)
    assert not out.exists()


def test_validation_label_outside_the_training_labels_names_the_record(
    tmp_path, encoder_dir, topics_jsonl, capsys
):
    val = tmp_path / "val.jsonl"
    val.write_text(
        json.dumps({"text": "a", "label": "email"})
        + "\n"
        + json.dumps({"text": "b", "label": "json"})
    )
    out = tmp_path / "run"
    argv = classify_argv(encoder_dir, topics_jsonl, out, "--val", str(val))
    check_error(capsys, argv, "--val", "val.jsonl, record 2", "'json'", "asyncio, email, xml")
    assert not out.exists()


def test_options_check_each_other():
    with pytest.raises(ConfigError, match="--format messages"):
        Options.from_flat({"task": "seq-cls", "format": "messages"})
    assert Options.from_flat({"task": "seq-cls", "metric": "f1"}).train.metric == "f1"
