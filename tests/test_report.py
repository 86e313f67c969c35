"""Reports built from hand-made run folders: no model, no training, milliseconds each.

One matrix of run shapes (complete, partial, failed/skipped, several seeds, nothing
completed, nested) × one set of generic checks on summary.md and report.html, then a
few specific checks, and one slow test that renders the page in headless Chromium.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from rankwise.errors import ConfigError
from rankwise.records import COMPLETE, FAILED, SKIPPED, TrialResult
from rankwise.report.html import write_report
from rankwise.report.summary import (
    config_snippet,
    rank_table_rows,
    summary_markdown,
    trial_table_rows,
    write_summary,
)
from rankwise.report.view import load_run
from rankwise.storage.store import RunStore

from .conftest import make_spec

# A plateau after r=4, like "LoRA Without Regret"'s curve: 4 -> 8 gains < 1%.
LOSSES = {1: 3.40, 2: 3.20, 4: 3.05, 8: 3.04, 16: 3.035, 32: 3.034}
PARAMS_PER_RANK = 12_288  # a tiny model's trainable params per unit of rank
FIGURES = 5  # report.html's figures (rankwise.report.html)
# How the hand-made trials say they were trained (the config snippet reads it back).
TRAINED_AS = {
    "lora_alpha": 16.0,
    "max_steps": 40,
    "lr": 2e-4,
    "model": {"model": "tiny"},
    "data_dir": "/tmp/data",
}


def result(rank: int, seed: int = 0, status: str = COMPLETE, **kw) -> TrialResult:
    """A plausible trial: losses fall to LOSSES[rank] (+ a seed offset), costs grow with r."""
    if status != COMPLETE:
        return TrialResult(key=f"r{rank}-s{seed}", rank=rank, seed=seed, status=status, **kw)
    best = LOSSES[rank] + 0.004 * seed
    steps = [0, 10, 20, 30, 40]
    fields = dict(
        lora_alpha=16.0,
        best_val_loss=best,
        best_step=40,
        final_train_loss=best - 0.05,
        train_curve=[(s, best + 1.5 * math.exp(-s / 10) - 0.05) for s in steps],
        val_curve=[(s, best + 1.2 * math.exp(-s / 12)) for s in steps],
        trainable_params=PARAMS_PER_RANK * rank,
        steps=40,
        train_tokens=40 * 512,
        wall_seconds=10.0 + rank,
        tokens_per_second=2000.0 - rank,
        peak_memory_bytes=300 * 2**20 + rank * 2**20,
        predicted={"peak_memory_bytes": 310 * 2**20 + rank * 2**20, "wall_seconds": 9.0 + rank},
    )
    fields.update(kw)
    return TrialResult(key=f"r{rank}-s{seed}", rank=rank, seed=seed, status=status, **fields)


def make_run(
    root: Path,
    results: list[TrialResult],
    running: tuple[tuple[int, int], ...] = (),
    name: str = "demo",
    model: str = "tiny-llama",
    recommendation: bool = True,
    seeds: int = 1,
) -> Path:
    """A run folder as a search leaves it; ``recommendation=False`` is a search still running."""
    run_dir = root / "run"
    store = RunStore(run_dir)
    store.set_meta("name", name)
    store.set_meta(
        "options",
        {
            "model": model,
            "train": "data.jsonl",
            "criterion": "relative",
            "threshold": 0.01,
            "strategy": "ladder",
            "ranks": [1, 2, 4, 8, 16, 32],
            "seeds": seeds,
            "alpha_policy": "fixed",
            "max_steps": 40,
            "target_modules": ["q_proj", "v_proj"],
            "name": name,
        },
    )
    store.set_meta(
        "data",
        {
            "format": "<text>",
            "train_records": 1200,
            "val_records": 120,
            "train_blocks": 310,
            "seq_len": 64,
        },
    )
    for r in results:
        store.start(make_spec(r.rank, seed=r.seed, **TRAINED_AS))
        store.finish(r)
    for rank, seed in running:
        store.start(make_spec(rank, seed=seed, **TRAINED_AS))
    if recommendation:
        write_recommendation(run_dir, store, model, name)
    store.close()
    return run_dir


def write_recommendation(run_dir: Path, store: RunStore, model: str, name: str) -> None:
    """What the search writes when it ends (the same keys, computed the same way)."""
    from rankwise.core.criteria import recommend
    from rankwise.core.scores import rank_scores

    scores = rank_scores(store.results())
    rec = recommend(scores, 0.01, stop_reason="plateau")
    lora = (
        {**store.spec(f"r{rec.rank}-s0").lora.kwargs(), "task_type": "CAUSAL_LM"}
        if rec.rank
        else None
    )
    (run_dir / "recommendation.json").write_text(
        json.dumps(
            {
                "rank": rec.rank,
                "loss": rec.loss,
                "best_rank": rec.best_rank,
                "best_loss": rec.best_loss,
                "reason": rec.reason,
                "stop_reason": rec.stop_reason,
                "criterion": {"kind": "relative", "threshold": 0.01},
                "strategy": "ladder",
                "lora_config": lora,
                "adapter_dir": "adapter" if lora else None,
                "model": model,
                "name": name,
                "trials": [],
                "scores": [
                    {"rank": s.rank, "mean": s.mean, "se": s.se, "n": s.n, "status": s.status}
                    for s in scores
                ],
                "confidence": "high: the two ranks above agree within 0.3%",
            }
        )
    )


def oom(rank: int) -> TrialResult:
    return result(
        rank,
        status=FAILED,
        reason="out of memory: CUDA OOM at step 3",
        wall_seconds=4.0,
        peak_memory_bytes=2**33,
    )


CASES = {
    "complete": lambda root: make_run(root, [result(r) for r in (1, 2, 4, 8, 16)]),
    "partial": lambda root: make_run(
        root, [result(4), result(8)], running=((16, 0),), recommendation=False
    ),
    "failed-skipped": lambda root: make_run(
        root,
        [
            result(1),
            result(2),
            result(4),
            result(8),
            oom(16),
            result(
                32,
                status=SKIPPED,
                reason="over --max-trainable-params",
                predicted={"peak_memory_bytes": 9 * 2**30, "wall_seconds": 90.0},
            ),
        ],
    ),
    "seeds": lambda root: make_run(
        root, [result(r, s) for r in (2, 4, 8) for s in range(3)], seeds=3
    ),
    "none-completed": lambda root: make_run(
        root, [oom(4), result(8, status=FAILED, reason="NaN loss at step 7")]
    ),
    "empty-running": lambda root: make_run(root, [], running=((4, 0),), recommendation=False),
    "nested": lambda root: make_run(
        root, [result(r, kind="nested", extra={"nested": True}) for r in (1, 2, 4, 8)]
    ),
}


class _Page(HTMLParser):
    """Collects tags, attributes and text; HTMLParser raises on nothing, so we count."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


@pytest.mark.parametrize("case", sorted(CASES))
def test_reports_of_every_run_shape(tmp_path, case):
    run_dir = CASES[case](tmp_path)
    view = load_run(run_dir)
    summary = write_summary(run_dir).read_text()
    page = write_report(run_dir).read_text()

    assert summary.startswith("# rankwise: demo")
    assert "## Trials" in summary and "| rank | seed | status |" in summary
    parsed = parse(page)
    # loss, cost, Pareto front, the answer over steps, learning curves: all inline
    assert parsed.tags.count("img") == FIGURES and page.count("data:image/png;base64,") == FIGURES
    assert parsed.tags.count("table") >= 2 and "script" not in parsed.tags
    for needle in ("http://", "https://", 'src="//', "<script"):
        assert needle not in page
    srcs = [v for k, v in parsed.attrs if k in ("src", "href")]
    assert all(v.startswith("data:image/png;base64,") for v in srcs)
    assert len(trial_table_rows(view)) == len(view.results) + len(view.running)
    assert ("in progress" in page) == (not view.finished)


def test_complete_run_recommends_and_shows_how_to_load(tmp_path):
    run_dir = CASES["complete"](tmp_path)
    view = load_run(run_dir)
    assert view.finished and view.status == "complete"
    assert view.recommendation.rank == 4  # 8 gains only 0.3% over 4
    snippet = config_snippet(view)
    assert "config = LoraConfig(\n    r=4,\n    lora_alpha=16.0," in snippet
    assert 'target_modules=["q_proj", "v_proj"],' in snippet and 'task_type="CAUSAL_LM",' in snippet
    assert (
        f'model = PeftModel.from_pretrained(base_model, "{run_dir.as_posix()}/adapter")' in snippet
    )
    compile(snippet, "snippet", "exec")  # it is Python
    verdicts = {row["rank"]: row["verdict"] for row in rank_table_rows(view)}
    assert verdicts["4"] == "recommended" and verdicts["16"] == "lowest loss"
    assert verdicts["8"] == "as good as the best" and verdicts["1"] == ""
    summary = summary_markdown(run_dir)
    assert "## Recommendation: r = 4" in summary and "confidence: high" in summary
    assert "| 4 | 0 | complete | 3.0500 | 40 | 49,152 | 304.00 MiB | 314.00 MiB |" in summary
    assert "```python\nfrom peft import LoraConfig, PeftModel" in summary
    assert "1,200 train / 120 val (\\<text\\>; 310 blocks of 64 tokens)" in summary
    assert "1,200 train / 120 val (&lt;text&gt;; 310 blocks" in write_report(view).read_text()


def test_partial_run_is_provisional(tmp_path):
    view = load_run(CASES["partial"](tmp_path))
    assert not view.finished and view.status.startswith("in progress (1 trial")
    assert view.recommendation.rank == 4  # provisional, from r=4 and r=8 only
    assert view.recommendation.best_rank == 8
    assert view.recommendation.lora_config["r"] == 4  # the spec the r=4 trial ran
    running = trial_table_rows(view)[-1]
    assert (running["rank"], running["status"]) == ("16", "running")
    assert running["diagnosis / reason"].startswith("running for")
    summary = summary_markdown(view)
    assert "Provisional: the search has not finished" in summary
    assert "# the adapter is written there when the search finishes" in summary


def test_failed_and_skipped_trials_keep_their_reasons(tmp_path):
    view = load_run(CASES["failed-skipped"](tmp_path))
    rows = {row["rank"]: row for row in trial_table_rows(view)}
    assert rows["16"]["status"] == FAILED
    assert rows["16"]["diagnosis / reason"] == "out of memory: CUDA OOM at step 3"
    assert rows["16"]["peak memory"] == "8.00 GiB"
    assert rows["32"]["status"] == SKIPPED and rows["32"]["wall s"] == "-"
    assert (
        rows["32"]["peak memory (pred.)"] == "9.00 GiB" and rows["32"]["wall s (pred.)"] == "90.0"
    )
    page = write_report(view).read_text()
    assert "over --max-trainable-params" in page


def test_several_seeds_pool_to_mean_and_standard_error(tmp_path):
    view = load_run(CASES["seeds"](tmp_path))
    row = next(r for r in rank_table_rows(view) if r["rank"] == "4")
    # seeds add 0, 0.004, 0.008: mean 3.054, sample sd 0.004, SE 0.004/sqrt(3)
    assert row["val loss"] == "3.0540 ± 0.0023" and row["seeds"] == "3"
    assert "seeds**: 3" in summary_markdown(view)


def test_no_completed_trial_recommends_nothing(tmp_path):
    view = load_run(CASES["none-completed"](tmp_path))
    assert view.recommendation.rank is None and config_snippet(view) == ""
    assert "no trial completed; nothing to recommend" in summary_markdown(view)
    assert "no recommendation yet" in write_report(view).read_text()


def test_nested_trials_are_labelled(tmp_path):
    view = load_run(CASES["nested"](tmp_path))
    assert all("nested-rank training" in r["diagnosis / reason"] for r in trial_table_rows(view))


def test_diagnosis_is_shown(tmp_path):
    diagnosis = {"label": "overfitting", "advice": "val loss rises after step 20; stop earlier"}
    run_dir = make_run(tmp_path, [result(1, extra={"diagnosis": diagnosis}), result(2)])
    rows = trial_table_rows(run_dir)
    assert (
        rows[0]["diagnosis / reason"] == "overfitting: val loss rises after step 20; stop earlier"
    )
    assert "overfitting: val loss rises" in write_report(run_dir).read_text()


def test_hostile_strings_are_escaped(tmp_path):
    name = "<script>alert(1)</script>"
    model = '"><img src=x onerror=alert(2)>'
    reason = "<b>boom</b> | & more"
    run_dir = make_run(
        tmp_path, [result(1), result(2, status=FAILED, reason=reason)], name=name, model=model
    )
    page = write_report(run_dir).read_text()
    parsed = parse(page)
    assert "script" not in parsed.tags and "b" not in parsed.tags
    assert [t for t in parsed.tags if t == "img"] == ["img"] * FIGURES  # only the figures
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert name in "".join(parsed.text)  # shown as text
    assert "onerror" not in " ".join(f"{k}={v}" for k, v in parsed.attrs)
    summary = summary_markdown(run_dir)
    assert "<script>" not in summary and "\\<b\\>boom\\</b\\> \\| & more" in summary


def test_not_a_run_directory(tmp_path):
    with pytest.raises(ConfigError, match="no rankwise run here"):
        load_run(tmp_path)


def _chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    )


@pytest.mark.slow
def test_report_renders_in_a_browser(tmp_path):
    """Headless Chromium draws the page, offline; the screenshot must not be blank."""
    from PIL import Image

    browser = _chromium()
    assert browser, "chromium is not installed (make test installs it: scripts/test-deps)"
    run_dir = CASES["failed-skipped"](tmp_path)
    page = write_report(run_dir)
    png = tmp_path / "report.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--window-size=1200,2000",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    artifacts = Path(__file__).resolve().parents[1] / "runs" / "test-artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copy(png, artifacts / "report.png")  # for a person to look at
    image = Image.open(png).convert("L")
    assert image.size == (1200, 2000)
    pixels = list(image.getdata())
    mean = sum(pixels) / len(pixels)
    variance = sum((p - mean) ** 2 for p in pixels) / len(pixels)
    assert variance > 100, f"screenshot looks blank (pixel variance {variance:.1f})"
    assert sum(p < 128 for p in pixels) > 5_000  # dark pixels: text and plot lines
