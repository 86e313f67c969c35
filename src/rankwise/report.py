"""Reports of a run, read from its directory alone: ``summary.md`` and ``report.html``.

Nothing here loads the model, and torch is imported only to read the delivered adapter's
weights for its spectra: the run folder (``trials.sqlite`` and, once the search has
finished, ``recommendation.json`` and ``adapter/``) is enough, so a report can be
rebuilt on another machine, or while a search is still writing (SQLite WAL lets us
read alongside it). Until ``recommendation.json`` exists the recommendation is
provisional, recomputed from the trials finished so far.

The HTML report is one self-contained file: figures are base64 PNGs, the CSS is
inline, there is no script and no remote URL, so it opens offline and can be mailed.
Every string that comes from the user (run name, model id, paths, reasons) is escaped.

Example (a run folder with two finished trials and no recommendation yet):
    >>> import tempfile
    >>> from rankwise.records import TrialResult
    >>> store = RunStore(tempfile.mkdtemp())
    >>> for rank, loss in ((1, 3.2), (2, 3.1)):
    ...     store.finish(TrialResult(key=f"r{rank}-s0", rank=rank, seed=0, status="complete",
    ...                              best_val_loss=loss))
    >>> view = load_run(store.dir)
    >>> [row["val loss"] for row in rank_table_rows(view)], view.finished
    (['3.2000', '3.1000'], False)
    >>> write_report(view).name
    'report.html'
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import metrics
from .config import DEFAULT_RANKS, ConfigError, format_bytes
from .plots import cost_figure, curves_figure, loss_figure, pareto_figure
from .records import COMPLETE, FAILED, SKIPPED, TrialKind, TrialResult
from .search import Criterion, RankScore, improvement_share, rank_scores, recommend
from .store import RunStore

__all__ = [
    "RunView",
    "load_run",
    "trial_table_rows",
    "rank_table_rows",
    "config_snippet",
    "summary_markdown",
    "write_summary",
    "report_html",
    "write_report",
]

RECOMMENDATION_FILE = "recommendation.json"
SUMMARY_FILE = "summary.md"
REPORT_FILE = "report.html"

# Every key a recommendation has; recommendation.json may omit the optional ones.
_REC_DEFAULTS: dict[str, Any] = {
    "rank": None,
    "loss": None,
    "best_rank": None,
    "best_loss": None,
    "reason": "",
    "stop_reason": "",
    "criterion": None,
    "base_val_loss": None,
    "strategy": "",
    "lora_config": {},
    "adapter_dir": None,
    "model": "",
    "confidence": None,
    "diagnosis": None,
}


@dataclass(frozen=True)
class RunView:
    """Everything a report shows, read from a run directory."""

    run_dir: Path
    name: str
    options: dict[str, Any]
    results: list[TrialResult]
    running: list[dict[str, Any]]
    scores: list[RankScore]
    recommendation: dict[str, Any]
    finished: bool
    """True once ``recommendation.json`` exists (the search ended and wrote its verdict)."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What the data loader recorded: format, record and block counts, seq_len."""
    side: list[TrialResult] = dataclasses.field(default_factory=list)
    """Trials outside the rank curve (learning-rate calibration, co-tuning, the final trial
    of a nested search, other target sets): listed, not pooled into scores."""

    @property
    def model(self) -> str:
        return str(self.recommendation.get("model") or self.options.get("model") or "")

    @property
    def criterion(self) -> Criterion:
        c = self.recommendation.get("criterion") or {}
        if not isinstance(c, dict):
            c = {}
        return Criterion(
            c.get("kind") or self.options.get("criterion") or "share",
            c.get("threshold", self.options.get("threshold")),
        )

    @property
    def base_loss(self) -> float | None:
        """The base model's val loss (no adapter), when the run measured it."""
        base = next((r for r in self.side if r.kind == TrialKind.BASE and r.ok), None)
        return base.best_val_loss if base else self.recommendation.get("base_val_loss")

    def good_limit(self) -> float | None:
        """The val loss at or below which a rank counts as good as the best (the band of the
        loss plot); None for the knee criterion, which has no such band."""
        best = min((s.mean for s in self.scores if s.ok), default=None)
        c = self.criterion.resolve(self.base_loss)
        if best is None or c.kind == "knee":
            return None
        if c.kind == "share":
            return best + (1 - c.threshold) * max(0.0, self.base_loss - best)
        return best * (1 + c.threshold)

    def share(self, loss: float | None) -> float | None:
        """A loss's share of the improvement over the base model that the best rank made."""
        best = min((s.mean for s in self.scores if s.ok), default=None)
        if loss is None or best is None:
            return None
        return improvement_share(loss, self.base_loss, best)

    @property
    def metric(self) -> str:
        """What the scores hold: ``loss``, or ``accuracy``/``f1`` as ``1 - metric``."""
        return str(self.options.get("metric") or "loss")

    @property
    def status(self) -> str:
        if self.finished:
            return "complete"
        if self.running:
            return f"in progress ({len(self.running)} trial(s) running)"
        return "in progress (or interrupted: no recommendation.json yet)"

    def ranks(self) -> list[int]:
        """Candidate and tried ranks, ascending: the x axis of every per-rank plot."""
        tried = {r.rank for r in self.results} | {int(t["rank"]) for t in self.running}
        return sorted(tried | set(self.options.get("ranks") or [])) or list(DEFAULT_RANKS)


def load_run(run_dir: str | Path) -> RunView:
    """Read a run directory: its trials, options and (final or provisional) recommendation."""
    run_dir = Path(run_dir)
    store = RunStore(run_dir, readonly=True)
    try:
        options = store.get_meta("options") or {}
        name = store.get_meta("name") or options.get("name") or run_dir.name
        everything, running = store.results(), store.running()
        # A trial a parallel search ran ahead and never needed is listed, not on the curve.
        curve = [r.on_curve and not r.extra.get("speculative") for r in everything]
        results = [r for r, c in zip(everything, curve, strict=True) if c]
        side = [r for r, c in zip(everything, curve, strict=True) if not c]
        data = store.get_meta("data") or {}
        final = _read_recommendation(run_dir)
        if final is None:
            scores = rank_scores(results)
            rec = _provisional(store, results, scores, options, side)
        else:
            scores = [_score_from_dict(s) for s in final.get("scores") or []] or rank_scores(
                results
            )
            rec = final
    finally:
        store.close()
    rec = {**_REC_DEFAULTS, **rec}
    finished = final is not None
    return RunView(run_dir, str(name), options, results, running, scores, rec, finished, data, side)


def _read_recommendation(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RECOMMENDATION_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _score_from_dict(d: dict[str, Any]) -> RankScore:
    return RankScore(
        int(d["rank"]),
        d.get("mean"),
        float(d.get("se") or 0.0),
        int(d.get("n") or 0),
        str(d.get("status", "")),
        str(d.get("reason", "")),
    )


def _provisional(
    store: RunStore,
    results: list[TrialResult],
    scores: list[RankScore],
    options: dict[str, Any],
    side: list[TrialResult],
) -> dict[str, Any]:
    """The recommendation the trials finished so far support; its LoraConfig is the one
    the recommended rank's trial was built from."""
    criterion = Criterion(options.get("criterion") or "knee", options.get("threshold"))
    base = next((r.best_val_loss for r in side if r.kind == TrialKind.BASE and r.ok), None)
    found, metric = recommend(scores, criterion, base_loss=base), options.get("metric") or "loss"
    if metric != "loss":
        found = dataclasses.replace(found, reason=metrics.reason(found, scores, criterion, metric))
    rec = dataclasses.asdict(found)
    lora: dict[str, Any] = {}
    key = next((r.key for r in results if r.ok and r.rank == rec["rank"]), None)
    if key is not None and (spec := store.spec(key)) is not None:
        lora = spec.lora.kwargs()
    return {
        **rec,
        "criterion": {"kind": criterion.kind, "threshold": criterion.threshold},
        "base_val_loss": base,
        "strategy": options.get("strategy", ""),
        "lora_config": lora,
        "model": options.get("model", ""),
    }


def _view(run: str | Path | RunView) -> RunView:
    return run if isinstance(run, RunView) else load_run(run)


# -- tables ------------------------------------------------------------------------------
def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _note(r: TrialResult) -> str:
    """Why a trial ended as it did: its reason, its diagnosis and any special circumstance."""
    parts = [r.reason] if r.reason else []
    diagnosis = r.extra.get("diagnosis")
    if isinstance(diagnosis, dict) and diagnosis.get("label"):
        advice = diagnosis.get("advice")
        parts.append(f"{diagnosis['label']}: {advice}" if advice else str(diagnosis["label"]))
    elif isinstance(diagnosis, str) and diagnosis:
        parts.append(diagnosis)
    if r.time_limited:
        parts.append("stopped by the time limit")
    if r.early_stopped:
        parts.append(f"early stopped at step {r.steps} (--early-stopping-patience)")
    if r.kind == TrialKind.NESTED:
        parts.append("nested-rank training (one run, truncated)")
    for attempt in r.extra.get("attempts") or []:
        parts.append(f"retried: worker {attempt.get('worker')} lost ({attempt.get('reason')})")
    if r.extra.get("speculative"):
        parts.append("speculative: run ahead in parallel, not needed by the search")
    return "; ".join(parts)


def _has_prediction(view: RunView, key: str) -> bool:
    return any(r.predicted.get(key) is not None for r in view.results)


def _error(predicted: float | None, measured: float | None) -> str:
    """Signed relative error of a prediction, (predicted - measured) / measured."""
    if not predicted or not measured:
        return "-"
    return f"{(predicted - measured) / measured:+.0%}"


def trial_table_rows(run: str | Path | RunView) -> list[dict[str, str]]:
    """One dict of display strings per trial (finished, then running); same keys in every row.

    Predicted columns appear only when some trial carries that prediction.
    """
    view = _view(run)
    pred_mem = _has_prediction(view, "peak_memory_bytes")
    pred_wall = _has_prediction(view, "wall_seconds")
    grouped = bool(view.side)
    workers = any(r.extra.get("worker") for r in view.results + view.side)
    trials = sorted(view.results + view.side, key=lambda t: (t.group, t.rank, t.seed))
    measured = list(dict.fromkeys(k for r in trials for k in r.val_metrics if k != view.metric))
    score = "best val loss" if view.metric == "loss" else f"best {metrics.label(view.metric)}"
    rows = []
    for r in trials:
        row = {
            "rank": str(r.rank),
            "seed": str(r.seed),
            "status": r.status,
            score: _num(metrics.shown(r.metric, r.best_val_loss), ".4f"),
        }
        for key in measured:  # a classifier's other metrics at the same checkpoint
            row[metrics.label(key)] = _num(r.val_metrics.get(key), ".4f")
        row |= {
            "best step": _num(r.best_step, "d"),
            "trainable params": _num(r.trainable_params, ",d"),
            "peak memory": format_bytes(r.peak_memory_bytes),
        }
        if pred_mem:
            row["peak memory (pred.)"] = format_bytes(r.predicted.get("peak_memory_bytes"))
            row["pred. error"] = _error(r.predicted.get("peak_memory_bytes"), r.peak_memory_bytes)
        row["tokens/s"] = _num(r.tokens_per_second, ",.0f")
        row["wall s"] = _num(r.wall_seconds or None, ".1f")  # 0: never ran (skipped)
        if pred_wall:
            row["wall s (pred.)"] = _num(r.predicted.get("wall_seconds"), ".1f")
            row["wall error"] = _error(r.predicted.get("wall_seconds"), r.wall_seconds or None)
        if grouped:
            row["group"] = r.group
        if workers:
            row["worker"] = str(r.extra.get("worker", "-"))
        row["diagnosis / reason"] = _note(r)
        rows.append(row)
    keys = list(rows[0]) if rows else None
    for t in sorted(view.running, key=lambda t: (t["rank"], t["seed"])):
        row = dict.fromkeys(keys or ["rank", "seed", "status", "diagnosis / reason"], "-")
        started = t.get("started_at")
        row.update(rank=str(t["rank"]), seed=str(t["seed"]), status="running")
        row["diagnosis / reason"] = f"running for {time.time() - started:.0f} s" if started else ""
        rows.append(row)
    return rows


def rank_table_rows(run: str | Path | RunView) -> list[dict[str, str]]:
    """One dict of display strings per rank: pooled val loss (mean ± SE over seeds) and verdict."""
    view = _view(run)
    rec, rows = view.recommendation, []
    limit = view.good_limit()
    for s in view.scores:
        params = [
            r.trainable_params
            for r in view.results
            if r.rank == s.rank and r.trainable_params is not None
        ]
        loss = _num(metrics.shown(view.metric, s.mean), ".4f") + (
            f" ± {s.se:.4f}" if s.n > 1 else ""
        )
        verdict = ""
        if s.rank == rec["rank"]:
            verdict = "recommended" + ("" if view.finished else " (provisional)")
        elif s.rank == rec["best_rank"]:
            verdict = (
                "lowest loss" if view.metric == "loss" else f"best {metrics.label(view.metric)}"
            )
        elif s.ok and limit is not None and s.mean <= limit:
            verdict = "as good as the best"
        share = view.share(s.mean)
        rows.append(
            {
                "rank": str(s.rank),
                "status": s.status,
                metrics.label(view.metric): loss,
                "share of improvement": f"{share:.1%}" if share is not None else "-",
                "seeds": str(s.n),
                "trainable params": _num(params[0] if params else None, ",d"),
                "verdict": verdict,
                "reason": s.reason,
            }
        )
    return rows


# -- the recommendation as code ----------------------------------------------------------
def _py(value: Any) -> str:
    """A Python literal for JSON-like data (strings double-quoted, as users write them)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_py(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_py(k)}: {_py(v)}" for k, v in value.items()) + "}"
    return repr(value)


def config_snippet(run: str | Path | RunView) -> str:
    """Copy-pasteable Python: the recommended ``LoraConfig`` and how to load the adapter."""
    view = _view(run)
    rec = view.recommendation
    if not rec["lora_config"]:
        return ""
    lora = rec["lora_config"]
    first = [k for k in ("r", "lora_alpha", "use_rslora", "target_modules") if k in lora]
    args = "".join(f"    {k}={_py(lora[k])},\n" for k in first + sorted(set(lora) - set(first)))
    adapter = (view.run_dir / (rec["adapter_dir"] or "adapter")).as_posix()
    lines = [
        "from peft import LoraConfig, PeftModel",
        "",
        f"config = LoraConfig(\n{args})",
        "",
    ]
    base = _base_lines(view)
    lines += base or [f"# base_model: the model the search trained on, {_py(view.model)}"]
    if not rec["adapter_dir"]:
        lines.append("# the adapter is written there when the search finishes")
    lines.append(f"model = PeftModel.from_pretrained(base_model, {_py(adapter)})")
    return "\n".join(lines)


def _base_lines(view: RunView) -> list[str]:
    """How to load the base as the search did, when that takes more than the model's name:
    a classifier head over the run's labels, a bitsandbytes quantization (rankwise.quantize)."""
    rec = view.recommendation
    quantization, labels = rec.get("quantization_config"), rec.get("labels")
    if not quantization and not labels:
        return []
    auto = "AutoModelForSequenceClassification" if labels else "AutoModelForCausalLM"
    args = [_py(view.model)]
    if labels:
        names = [str(v) for v in labels]
        args += [f"num_labels={len(names)}", f"id2label={_py(dict(enumerate(names)))}"]
    lines = [f"from transformers import {auto}" + (", BitsAndBytesConfig" if quantization else "")]
    if quantization:
        lines.append("from peft import prepare_model_for_kbit_training")
        args.append(f"quantization_config=BitsAndBytesConfig(**{_py(quantization)})")
    if view.model == "smollm2" or view.model.endswith(".gguf"):
        lines.append(f"# {view.model}: a GGUF model; pass the directory rankwise converted it to")
    lines.append(f"base_model = {auto}.from_pretrained({', '.join(args)})")
    if quantization:
        lines.append(
            "base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)"
        )
    return lines


# -- summary.md --------------------------------------------------------------------------
def _md(text: Any) -> str:
    """A table cell / inline text: no line breaks, no pipes, no raw HTML."""
    text = str(text).replace("\n", " ").replace("|", "\\|")
    return text.replace("<", "\\<").replace(">", "\\>")


def _md_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_none yet_\n"
    head = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    return head + "".join("| " + " | ".join(_md(v) for v in row.values()) + " |\n" for row in rows)


def _data_fact(data: dict[str, Any]) -> str:
    if "train_records" not in data:
        return ""
    return (
        f"{data['train_records']:,} train / {data.get('val_records', 0):,} val "
        f"({data.get('format', '?')}; {data.get('train_blocks', '?')} blocks of "
        f"{data.get('seq_len', '?')} tokens)"
    )


def _facts(view: RunView) -> list[tuple[str, str]]:
    """Key facts of the run, as (label, plain text) pairs, for both reports."""
    counts: dict[str, int] = {}
    for r in view.results:
        counts[r.status] = counts.get(r.status, 0) + 1
    if view.running:
        counts["running"] = len(view.running)
    o, rec = view.options, view.recommendation
    facts = [
        ("status", view.status),
        ("model", view.model),
        ("train data", o.get("train")),
        ("records", _data_fact(view.data)),
        ("run directory", str(view.run_dir)),
        ("strategy", rec["strategy"] or o.get("strategy")),
        ("criterion", view.criterion.resolve(view.base_loss).describe()),
        ("base model val loss (no adapter)", _num(view.base_loss, ".4f")),
        ("task", o.get("task") if o.get("task") not in (None, "causal-lm") else None),
        ("labels", view.data.get("labels")),
        ("quantized base", o.get("quantize") if o.get("quantize") not in (None, "none") else None),
        ("metric", _metric_fact(view.metric)),
        ("alpha policy", o.get("alpha_policy")),
        ("target modules", o.get("target_modules")),
        ("learning rate", _lr_fact(rec.get("learning_rate"))),
        ("precision", rec.get("precision")),
        ("max steps", o.get("max_steps")),
        ("seeds", o.get("seeds", 1)),
        ("trials", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"),
        ("stop reason", rec["stop_reason"]),
    ]
    return [
        (k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
        for k, v in facts
        if v not in (None, "")
    ]


def _lr_fact(lr: Any) -> str | None:
    """The rate the answer holds for, and the calibration bracket it came from."""
    if not isinstance(lr, dict) or lr.get("lr") is None:
        return None
    if not lr.get("calibrated"):
        return f"{lr['lr']:g} (given)"
    lo, hi = (f"{x:g}" if x is not None else "?" for x in lr.get("bracket") or (None, None))
    extended = lr.get("extended") or []
    more = f"; range extended to {', '.join(f'{x:g}' for x in extended)}" if extended else ""
    return f"{lr['lr']:g} (calibrated at r={lr.get('rank')}, bracket {lo}..{hi}{more})"


def _metric_fact(metric: str) -> str | None:
    if metric == "loss":
        return None
    name = metrics.label(metric)
    return (
        f"{name} (higher is better); the search compares the error 1 - {name}, so gains and "
        "the criterion judge that error"
    )


def _rec_lines(view: RunView) -> list[str]:
    """The recommendation as plain sentences."""
    rec = view.recommendation
    lines = (
        []
        if view.finished
        else ["Provisional: the search has not finished; this is what the trials so far support."]
    )
    lines.append(rec["reason"] or "nothing to recommend yet")
    if rec["confidence"]:
        lines.append(f"confidence: {rec['confidence']}")
    diagnosis = rec["diagnosis"]
    if isinstance(diagnosis, dict):
        if diagnosis.get("advice"):
            lines.append(f"advice: {diagnosis['advice']}")
        counts = diagnosis.get("counts") or {}
        if counts:
            lines.append("diagnoses: " + ", ".join(f"{k} x{n}" for k, n in counts.items()))
        lines += [f"{k}: {v}" for k, v in diagnosis.items() if k not in ("advice", "counts")]
    elif diagnosis:
        lines.append(f"diagnosis: {diagnosis}")
    final = rec.get("final")
    if isinstance(final, dict) and final.get("final_val_loss") is not None:
        nested = final.get("nested_val_loss")
        lines.append(
            f"final ordinary trial at r={final['rank']}: val loss {final['final_val_loss']:.4f}"
            + (f" (nested curve at r={final['rank']}: {nested:.4f})" if nested is not None else "")
        )
    for key, label in (
        ("targets", "target sets"),
        ("tuning", "co-tuning"),
        ("per_layer", "per-layer ranks"),
    ):
        section = rec.get(key)
        if isinstance(section, dict) and section.get("verdict"):
            lines.append(f"{label}: {section['verdict']}")
    return lines


def summary_markdown(run: str | Path | RunView) -> str:
    """The run in Markdown: facts, recommendation (with code), per-rank and per-trial tables."""
    view = _view(run)
    rank = view.recommendation["rank"]
    out = [f"# rankwise: {_md(view.name)}\n"]
    out += [f"- **{k}**: {_md(v)}" for k, v in _facts(view)]
    out.append(f"\n## Recommendation: {'r = ' + str(rank) if rank is not None else 'none'}\n")
    out += [_md(line) + "\n" for line in _rec_lines(view)]
    if snippet := config_snippet(view):
        out.append(f"```python\n{snippet}\n```\n")
    out += [
        "## Ranks\n",
        _md_table(rank_table_rows(view)),
        "## Trials\n",
        _md_table(trial_table_rows(view)),
    ]
    return "\n".join(out)


def write_summary(run: str | Path | RunView) -> Path:
    """Write ``RUN_DIR/summary.md`` and return its path."""
    view = _view(run)
    path = view.run_dir / SUMMARY_FILE
    path.write_text(summary_markdown(view), encoding="utf-8")
    return path


# -- report.html -------------------------------------------------------------------------
_CSS = """
body { font: 15px/1.45 system-ui, sans-serif; color: #1d1d1f; margin: 0; background: #f6f6f8; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; word-break: break-all; }
h2 { font-size: 19px; margin: 0 0 10px; }
section { background: #fff; border-radius: 8px; padding: 16px 20px; margin: 16px 0;
          box-shadow: 0 1px 3px rgba(0,0,0,.08); }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; word-break: break-all; }
.rec .rank { font-size: 30px; font-weight: 700; color: #b3261e; margin: 4px 0; }
.banner { background: #fff4ce; border-left: 4px solid #e0a800; padding: 8px 12px; }
pre { background: #1e1e2e; color: #e6e6e6; padding: 12px 14px; border-radius: 6px;
      overflow-x: auto; font-size: 13px; }
img { width: 100%; height: auto; display: block; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid #e4e4e7; padding: 4px 8px; text-align: left;
         vertical-align: top; }
th { background: #f0f0f3; }
tr.failed td { background: #fdecea; } tr.skipped td { background: #fff8e1; }
tr.running td { background: #e8f0fe; }
"""

_ROW_CLASS = {FAILED: "failed", SKIPPED: "skipped", "running": "running", COMPLETE: "complete"}


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "<p>None yet.</p>"
    head = "".join(f"<th>{_e(k)}</th>" for k in rows[0])
    body = "".join(
        f'<tr class="{_ROW_CLASS.get(row.get("status", ""), "")}">'
        + "".join(f"<td>{_e(v)}</td>" for v in row.values())
        + "</tr>\n"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>\n{body}</tbody></table>"


def _header_html(view: RunView) -> str:
    facts = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _facts(view))
    return f'<h1>rankwise: {_e(view.name)}</h1>\n<section><dl class="facts">{facts}</dl></section>'


def _recommendation_html(view: RunView) -> str:
    rank = view.recommendation["rank"]
    lines = _rec_lines(view)
    banner = "" if view.finished else f'<p class="banner">{_e(lines.pop(0))}</p>'
    big = f"r = {rank}" if rank is not None else "no recommendation yet"
    paras = "".join(f"<p>{_e(line)}</p>" for line in lines)
    snippet = config_snippet(view)
    code = f"<pre><code>{_e(snippet)}</code></pre>" if snippet else ""
    return (
        f'<section class="rec"><h2>Recommendation</h2>{banner}'
        f'<p class="rank">{_e(big)}</p>{paras}{code}</section>'
    )


def _figure_html(title: str, fig: Any, caption: str) -> str:
    buf = io.BytesIO()
    # No "Software" text chunk: keeps the file free of URLs, even encoded ones.
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (
        f'<section><h2>{_e(title)}</h2><img alt="{_e(title)}" '
        f'src="data:image/png;base64,{data}"><p>{_e(caption)}</p></section>'
    )


def report_html(run: str | Path | RunView) -> str:
    """The whole report as one self-contained HTML page."""
    view = _view(run)
    name = metrics.label(view.metric).removeprefix("val ")
    score = "loss" if view.metric == "loss" else name
    figures = [
        (
            f"Validation {score} vs rank",
            loss_figure(view),
            f"Best validation {score} per rank (mean ± standard error over seeds); the dashed line "
            f"is the base model without an adapter; the band holds the {score}s the criterion "
            f"counts as good as the best; x marks at the top are ranks that failed or were "
            "skipped.",
        ),
        (
            "Cost vs rank",
            cost_figure(view),
            "Filled markers: measured; hollow markers and dashed lines: predicted before training.",
        ),
        (
            f"{score.capitalize()} vs trainable parameters",
            pareto_figure(view),
            f"Each rank's {score} against its adapter size; the line is the Pareto front.",
        ),
        (
            "Learning curves",
            curves_figure(view),
            f"Every trial's training loss and validation {score}, coloured by rank.",
        ),
    ]
    body = [_header_html(view), _recommendation_html(view)]
    body += [_figure_html(*f) for f in figures]
    body += [_spectra_html(view)]
    body += [
        f"<section><h2>Ranks</h2>{_html_table(rank_table_rows(view))}</section>",
        f"<section><h2>Trials</h2>{_html_table(trial_table_rows(view))}</section>",
        _options_html(view),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">\n'
        f"<title>rankwise: {_e(view.name)}</title>\n<style>{_CSS}</style></head>\n"
        "<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n"
    )


def _spectra_html(view: RunView) -> str:
    """The recommended adapter's effective ranks by layer × module, once it is delivered."""
    adapter = view.run_dir / (view.recommendation["adapter_dir"] or "adapter")
    if not adapter.is_dir():
        return ""
    from .plots import spectra_figure
    from .spectra import inspect_adapter  # reads the weights: imports torch, only here

    title = "Inside the recommended adapter"
    try:
        spectra = inspect_adapter(adapter)
    except ConfigError as exc:
        return f"<section><h2>{_e(title)}</h2><p>Cannot read it: {_e(exc)}</p></section>"
    p = spectra.proposal()
    return _figure_html(
        title,
        spectra_figure(spectra),
        "Effective rank of each module's update (fewest singular directions holding 90% of "
        f"its energy). Keeping 90% in every module needs {p.params:,} trainable parameters "
        f"instead of {p.uniform_params:,}; rankwise inspect {adapter} proposes the pattern.",
    )


def _options_html(view: RunView) -> str:
    rows = [
        {"option": k, "value": json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v}
        for k, v in sorted(view.options.items())
    ]
    return (
        f"<section><details><summary>All options ({len(rows)})</summary>"
        f"{_html_table(rows)}</details></section>"
    )


def write_report(run: str | Path | RunView) -> Path:
    """Write ``RUN_DIR/report.html`` (self-contained, offline) and return its path."""
    view = _view(run)
    path = view.run_dir / REPORT_FILE
    path.write_text(report_html(view), encoding="utf-8")
    return path
