"""recommendation.json as one typed document: every case the search can end in, built from
fabricated trials through the search core's ``recommend`` and the one writer, validated
against the shipped JSON Schema; its headline read word for word; an old file still read;
a ``--criterion-scale range`` run shown on its own scale. Torch-free, milliseconds each."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import fields
from fnmatch import fnmatch
from pathlib import Path

import jsonschema
import pytest

from rankwise.cli import main
from rankwise.core.scores import rank_scores
from rankwise.records import TrialKind, TrialResult
from rankwise.report.document import DEPRECATED, SCHEMA_FILE, RecommendationDoc, schema
from rankwise.report.recommendation import (
    RecommendationInputs,
    build_document,
    criterion_of,
    recommend_run,
    trainable_params,
)
from rankwise.report.summary import summary_markdown
from rankwise.report.view import load_run
from rankwise.report.words import unnest
from rankwise.storage.store import RunStore

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_BY_MEMORY = "predicted peak memory 30.00 GiB > --max-memory 20.00 GiB"


def trial(rank: int, loss: float | None, seed: int = 0, status: str = "complete", reason=""):
    return TrialResult(
        key=f"r{rank}-s{seed}",
        rank=rank,
        seed=seed,
        status=status,
        reason=reason,
        best_val_loss=loss,
        trainable_params=1024 * rank,
    )


def seeded(losses: dict[int, float], offsets=(0.0, 0.01, -0.01)) -> list[TrialResult]:
    """Three seeds a rank: a seed effect every rank shares, and a little noise of their own."""
    return [
        trial(r, v + o + 0.003 * (((r * 7 + s * 3) % 5) - 2), s)
        for r, v in losses.items()
        for s, o in enumerate(offsets)
    ]


def document(trials, options, base, stop="") -> RecommendationDoc:
    """What the search writes at its end, from these trials."""
    criterion, scores = criterion_of(options), rank_scores(trials)
    metric = options.get("metric", "loss")
    rec = recommend_run(scores, criterion, metric, stop, base, trainable_params(trials))
    lora = {"r": rec.rank, "lora_alpha": 16.0, "target_modules": ["q_proj"]} if rec.rank else None
    x = RecommendationInputs(rec, lora, trials, scores, criterion, base, options, "demo")
    return build_document(x)


KNEE = {"criterion": "knee", "threshold": 0.05, "strategy": "ladder", "model": "tiny"}
CASES = {
    "knee": lambda: document(
        seeded({1: 4.0, 2: 3.7, 4: 3.5, 8: 3.4, 16: 3.395, 32: 3.392}), KNEE, 4.4, "plateau"
    ),
    "indistinguishable": lambda: document(
        [trial(1, v, s) for s, v in enumerate((3.000, 3.030, 2.970))]
        + [trial(2, v, s) for s, v in enumerate((2.998, 2.990, 3.010))],
        {"criterion": "knee"},
        4.0,
    ),
    "lora does not help": lambda: document(
        seeded({1: 3.1205, 2: 3.1201, 4: 3.1203}), {"criterion": "knee"}, 3.1210
    ),
    "budget-limited": lambda: document(
        seeded({1: 3.6, 2: 3.4, 4: 3.3})
        + [trial(8, None, s, "skipped", SKIPPED_BY_MEMORY) for s in range(3)],
        {"criterion": "knee", "max_memory": 20 * 2**30},
        4.0,
    ),
    "task metric": lambda: document(
        seeded({2: 0.20, 4: 0.14, 8: 0.10, 16: 0.104}, (0.0, 0.005, -0.005)),
        {**KNEE, "metric": "accuracy", "task": "seq-cls"},
        0.5,
    ),
    "serving cap": lambda: document(
        seeded({1: 3.6, 8: 3.3, 16: 3.2}), {"criterion": "knee", "serve": "vllm"}, 4.0
    ),
}

HEADLINES = {
    "knee": "r=8: r=32 gains 0.26% more for 4x the parameters; r=4 is 3% worse (24 SE)",
    "indistinguishable": "r=2: r=1 and r=2 are indistinguishable at this budget, 0.022% "
    "apart (0.0 SE); r=2 is recommended, the smallest shown within 1% of the best",
    "lora does not help": "No rank: LoRA does not help this data at this budget; the best, "
    "r=1, gains only 0.048% over the base model (0.5 SE)",
    "budget-limited": "r=4, the largest rank within --max-memory: r=2 is 3% worse (24 SE)",
    "task metric": "r=8, accuracy 0.8990: r=16 is no better; r=4 is 4.1 points worse (9 SE)",
    "serving cap": "r=16, the largest rank vLLM serves at --max-lora-rank 16: r=8 is 3.2% "
    "worse (25 SE)",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_case_validates_against_the_schema(case):
    doc = CASES[case]()
    written = json.loads(json.dumps(doc.to_dict()))  # as the file holds it
    jsonschema.Draft202012Validator(schema()).validate(written)
    assert written["schema_version"] == 2
    assert RecommendationDoc.from_dict(written) == doc  # read back, the same record


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_headline_of_every_case(case):
    doc = CASES[case]()
    assert doc.headline == HEADLINES[case]
    # one sentence first, then short lines, and no parenthesis inside another anywhere
    for line in (doc.headline, *doc.evidence):
        assert unnest(line) == line, line
        assert "\n" not in line and len(line) < 200, line
    assert doc.evidence[0].startswith("criterion: ")


def test_the_evidence_says_the_rest():
    doc = CASES["knee"]()
    assert "val loss: r=8 3.4" in doc.evidence[1] and "base model 4.4000" in doc.evidence[1]
    assert any(line.startswith("confidence: ") for line in doc.evidence)
    assert any(line == "stopped: plateau" for line in doc.evidence)
    assert any(line.startswith("noise: ") and "df" in line for line in doc.evidence)
    assert CASES["task metric"]().evidence[1].startswith("accuracy: r=8 0.8990 ± 0.0050, the best")
    assert SKIPPED_BY_MEMORY in CASES["budget-limited"]().evidence[2]


def test_nested_words_are_unnested():
    stop = "plateau: r=8 gained +0.0019 over r=4 (+0.06%); another gain that size would not "
    stop += "change the answer (at the knee (no doubling of r above it gains more than 1% of "
    stop += "the improvement over the base model) or the noise)"
    doc = document(seeded({1: 4.0, 2: 3.7, 4: 3.5, 8: 3.4}), KNEE, 4.4, stop)
    assert "stopped: plateau: r=8 gained +0.0019 over r=4 (+0.06%)" in doc.evidence
    assert (
        "another gain that size would not change the answer (at the knee, no doubling of r "
        "above it gains more than 1% of the improvement over the base model, or the noise)"
    ) in doc.evidence
    assert unnest("(a (b (c)) d)") == "(a, b, c, d)"


def test_every_field_is_in_the_schema_and_the_readme():
    names = [f.name for f in fields(RecommendationDoc) if f.name != "extra"]
    properties = schema()["properties"]
    assert set(names) <= set(properties)
    assert set(properties) - set(names) == {"base_val_loss", "deprecated"}
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### recommendation.json")[1].split("\n\n")
    table = next(block for block in section if block.startswith("| key | what |"))
    cells = [row.split(" | ")[0] for row in table.splitlines()[2:]]
    documented = [name for cell in cells for name in re.findall(r"`([a-z_]+)`", cell)]
    assert set(documented) == set(properties), set(properties) ^ set(documented)


def test_the_schema_ships_with_the_package():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = package_data["package-data"]["rankwise"]
    assert any(fnmatch(f"report/{SCHEMA_FILE}", p) for p in patterns)
    assert schema()["properties"]["schema_version"]["minimum"] == 2


def test_a_renamed_key_keeps_its_old_name_for_one_version():
    doc = CASES["knee"]()
    written = doc.to_dict()
    assert written["base_val_loss"] == written["base_loss"] == 4.4
    assert set(written["deprecated"]) == set(DEPRECATED)
    with pytest.warns(DeprecationWarning, match="use base_loss"):
        assert doc.base_val_loss == 4.4


def test_a_version_1_file_still_reads(tmp_path):
    """The file rankwise wrote before the document: no schema_version, base_val_loss."""
    old = {
        "rank": 4,
        "loss": 3.05,
        "best_rank": 8,
        "best_loss": 3.04,
        "stop_reason": "plateau",
        "reason": "r=4: val loss 3.0500, within 1% of the best (3.0400 at r=8)",
        "confidence": "high",
        "base_loss": 3.9,
        "criterion": {"kind": "relative", "threshold": 0.01, "scale": "loss"},
        "base_val_loss": 3.9,
        "lora_config": {"r": 4},
        "budget": {"max_steps": 40, "lr": 2e-4},
        "scores": [
            {"rank": 4, "mean": 3.05, "se": 0.0, "n": 1, "status": "complete"},
            {"rank": 8, "mean": 3.04, "se": 0.0, "n": 1, "status": "complete"},
        ],
        "recipe_version": 7,  # a key this version does not know: kept
    }
    doc = RecommendationDoc.from_dict(old)
    assert (doc.schema_version, doc.base_loss, doc.rank) == (2, 3.9, 4)
    assert doc.extra == {"recipe_version": 7} and doc.to_dict()["recipe_version"] == 7
    assert doc.budget == {"max_steps": 40}  # budget.lr is learning_rate.lr's alias
    jsonschema.Draft202012Validator(schema()).validate(json.loads(json.dumps(doc.to_dict())))


# -- a --criterion-scale range run, shown on its own scale --------------------------------------
# Far from the base model (10.0), every rank reaches 90% of the improvement over it: on the
# base scale r=1 would do. Over the range from r=1 to the best only r=4 reaches 90%.
RANGE = {1: 3.5, 2: 3.2, 4: 3.05, 8: 3.04, 16: 3.035}
RANGE_OPTIONS = {
    "model": "tiny",
    "train": "data.txt",
    "criterion": "share",
    "threshold": 0.9,
    "criterion_scale": "range",
    "strategy": "grid",
    "ranks": sorted(RANGE),
}


def range_run(root: Path, finished: bool) -> Path:
    store = RunStore(root / "run")
    store.set_meta("options", RANGE_OPTIONS)
    store.set_meta("name", "range")
    store.finish(TrialResult(key="base", rank=0, seed=0, status="complete", best_val_loss=10.0,
                             kind=TrialKind.BASE))  # fmt: skip
    trials = [trial(r, v) for r, v in RANGE.items()]
    for t in trials:
        store.finish(t)
    if finished:
        doc = document(trials, RANGE_OPTIONS, 10.0, "grid complete")
        (root / "run" / "recommendation.json").write_text(json.dumps(doc.to_dict()))
    store.close()
    return root / "run"


@pytest.mark.parametrize("finished", [True, False], ids=["finished", "provisional"])
def test_show_states_a_range_scale_run_on_its_scale(tmp_path, capsys, finished):
    run = range_run(tmp_path, finished)
    view = load_run(run)
    assert view.finished == finished
    assert view.criterion.scale == "range"
    assert view.recommendation.rank == 4  # on the base scale: r=1
    assert main(["show", str(run)]) == 0
    shown = capsys.readouterr().out
    assert "at least 90% of the improvement from the smallest rank to the best" in shown
    assert "improvement over the base model)" not in shown.split("## Run")[1].split("## Ranks")[0]
    assert shown.index("**r=4") < shown.index("- criterion: ")  # the headline first
    # the band of the loss plot is the criterion's own margin: 10% of the range above the best
    assert view.good_limit() == pytest.approx(3.035 + 0.1 * (3.5 - 3.035))


def test_the_ranks_table_says_what_its_numbers_are(tmp_path):
    shown = summary_markdown(range_run(tmp_path, finished=True))
    note = shown.split("## Ranks")[1].split("## Trials")[0].strip().splitlines()[-1]
    assert "each rank's mean over its seeds, adjusted for the seed effects" in note
    assert "the trials table lists each trial's raw val loss" in note
