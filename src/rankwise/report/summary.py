"""summary.md and ``rankwise show``: the trial and rank tables, the recommendation in words."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rankwise.config import format_bytes
from rankwise.core import metrics
from rankwise.core.eta import duration
from rankwise.records import TrialKind, TrialResult
from rankwise.report.view import SUMMARY_FILE, RunView, _view
from rankwise.storage.rundir import ADAPTER_DIR


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
    if r.branch is not None:  # --branch-at: a branch names its trunk, a trunk says so
        parts.append(r.branch.describe())
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
    drift = bool(view.retain) or any(r.forgetting is not None for r in trials)
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
        if drift:
            row["forgetting"] = _num(r.forgetting, "+.4f")
            row["KL"] = _num(r.forgetting_kl, ".4f")
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
    drift = view.forgetting()
    drift = drift if drift or view.retain else None  # a run without a retain set: no column
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
        if s.rank == rec.rank:
            verdict = "recommended" + ("" if view.finished else " (provisional)")
        elif s.rank == rec.best_rank:
            verdict = (
                "lowest loss" if view.metric == "loss" else f"best {metrics.label(view.metric)}"
            )
        elif s.ok and limit is not None and s.mean <= limit:
            verdict = "as good as the best"
        share = view.share(s.mean)
        row = {
            "rank": str(s.rank),
            "status": s.status,
            metrics.label(view.metric): loss,
            "share of improvement": f"{share:.1%}" if share is not None else "-",
        }
        if drift is not None:  # what the rank costs the base model, beside its gain
            f = drift.get(s.rank) or {}
            row["forgetting"] = _num(f.get("forgetting"), "+.4f")
            row["KL"] = _num(f.get("forgetting_kl"), ".4f")
        row |= {
            "seeds": str(s.n),
            "trainable params": _num(params[0] if params else None, ",d"),
            "verdict": verdict,
            "reason": s.reason,
        }
        rows.append(row)
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
    if not rec.lora_config:
        return ""
    lora = rec.lora_config
    first = [k for k in ("r", "lora_alpha", "use_rslora", "target_modules") if k in lora]
    args = "".join(f"    {k}={_py(lora[k])},\n" for k in first + sorted(set(lora) - set(first)))
    adapter = (view.run_dir / (rec.adapter_dir or ADAPTER_DIR)).as_posix()
    lines = [
        "from peft import LoraConfig, PeftModel",
        "",
        f"config = LoraConfig(\n{args})",
        "",
    ]
    base = _base_lines(view)
    lines += base or [f"# base_model: the model the search trained on, {_py(view.model)}"]
    if not rec.adapter_dir:
        lines.append("# the adapter is written there when the search finishes")
    lines.append(f"model = PeftModel.from_pretrained(base_model, {_py(adapter)})")
    return "\n".join(lines)


def _base_lines(view: RunView) -> list[str]:
    """How to load the base as the search did, when that takes more than the model's name:
    a classifier head over the run's labels, a bitsandbytes quantization (rankwise.io.quantize)."""
    rec = view.recommendation
    quantization, labels = rec.quantization_config, rec.labels
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
        ("time left", None if view.time_left is None else f"at most {duration(view.time_left)}"),
        ("model", view.model),
        ("train data", o.get("train")),
        ("records", _data_fact(view.data)),
        ("run directory", str(view.run_dir)),
        ("strategy", rec.strategy or o.get("strategy")),
        ("criterion", view.criterion.resolve(view.base_loss).describe()),
        ("base model val loss (no adapter)", _num(view.base_loss, ".4f")),
        ("retain set", _retain_fact(view.retain, o.get("max_forgetting"))),
        ("task", o.get("task") if o.get("task") not in (None, "causal-lm") else None),
        ("labels", view.data.get("labels")),
        ("quantized base", o.get("quantize") if o.get("quantize") not in (None, "none") else None),
        ("metric", _metric_fact(view.metric)),
        ("alpha policy", o.get("alpha_policy")),
        ("target modules", o.get("target_modules")),
        ("learning rate", _lr_fact(rec.learning_rate)),
        ("precision", rec.precision),
        ("max steps", o.get("max_steps")),
        ("seeds", o.get("seeds", 1)),
        ("trials", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"),
        ("stop reason", rec.stop_reason),
    ]
    return [
        (k, ", ".join(map(str, v)) if isinstance(v, list) else str(v))
        for k, v in facts
        if v not in (None, "")
    ]


def _retain_fact(retain: dict | None, limit: float | None) -> str | None:
    """What forgetting is measured on (rankwise.training.retain)."""
    if not retain:
        return None
    what = "sampled from the base model" if retain["source"] == "self-sampled" else retain["source"]
    budget = f"; --max-forgetting {limit:g} nats" if limit is not None else ""
    return (
        f"{retain['sequences']} x {retain['length']} tokens {what}, base model loss "
        f"{retain['base_loss']:.4f} (sha256 {retain['sha256'][:12]}); forgetting: the "
        f"retain-loss increase over it, KL: mean KL(base || adapted){budget}"
    )


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


PROVISIONAL = "Provisional: the search has not finished; this is what the trials so far support."


def _headline(view: RunView) -> str:
    rec = view.recommendation
    return rec.headline or rec.reason or "nothing to recommend yet"


def _more_lines(view: RunView) -> list[str]:
    """What the search saw beside the answer: advice, races, stages, the answer over steps."""
    rec = view.recommendation
    lines = []
    diagnosis = rec.diagnosis
    if isinstance(diagnosis, dict):
        if diagnosis.get("advice"):
            lines.append(f"advice: {diagnosis['advice']}")
        counts = diagnosis.get("counts") or {}
        if counts:
            lines.append("diagnoses: " + ", ".join(f"{k} x{n}" for k, n in counts.items()))
        lines += [f"{k}: {v}" for k, v in diagnosis.items() if k not in ("advice", "counts")]
    elif diagnosis:
        lines.append(f"diagnosis: {diagnosis}")
    lines += _noise_lines(rec)
    final = rec.final
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
        section = getattr(rec, key)
        if isinstance(section, dict) and section.get("verdict"):
            lines.append(f"{label}: {section['verdict']}")
    return lines


def rank_table_note(view: RunView) -> str:
    """What the ranks table's numbers are, and why they differ from the trials table's."""
    what = metrics.label(view.metric)
    return (
        f"{what}: each rank's mean over its seeds, adjusted for the seed effects the ranks "
        "share (a seed that is lucky for one rank is lucky for all), ± its standard error; "
        f"the trials table lists each trial's raw {what}, so a single-seed rank may differ "
        "from its trial."
    )


def _noise_lines(rec) -> list[str]:
    """The races the noise caused and what they cost, the answer over steps (the noise
    itself is an evidence line)."""
    lines = []
    for race in rec.races:
        low, high = race["ranks"]
        if race.get("not_raced"):
            lines.append(race["not_raced"])
            continue
        lines.append(
            f"raced r={low} vs r={high}: +{len(race['added'])} trials "
            f"({race.get('train_tokens', 0):,} tokens, {race.get('wall_seconds', 0):.0f}s)"
        )
    cut = rec.stopped_early
    if cut:
        saved = sum(c.get("tokens_saved", 0) for c in cut)
        which = ", ".join(f"r={c['rank']} seed {c['seed']} at step {c['step']}" for c in cut)
        lines.append(
            f"stopped early (--stop-when-decided): {len(cut)} trial{'s' * (len(cut) != 1)} "
            f"({which}), {saved:,} tokens not trained; none could change the answer"
        )
    by_step = [a for a in rec.answer_by_step if a.get("rank")]
    if by_step:
        lines.append("answer by step: " + ", ".join(f"{a['step']}: r={a['rank']}" for a in by_step))
    budget = rec.budget or {}
    if budget.get("epochs") or budget.get("trial_budget", 1) < 1:
        lines.append(f"the answer holds for a trial budget of {budget['holds_for']}")
    if rec.answer_moved:
        lines.append(f"warning: {rec.answer_moved}")
    return lines


def summary_markdown(run: str | Path | RunView) -> str:
    """The run in Markdown: the recommendation (headline, evidence, code), the facts, the
    per-rank and per-trial tables."""
    view = _view(run)
    rank = view.recommendation.rank
    out = [f"# rankwise: {_md(view.name)}\n"]
    out.append(f"## Recommendation: {'r = ' + str(rank) if rank is not None else 'none'}\n")
    if not view.finished:
        out.append(PROVISIONAL + "\n")
    out.append(f"**{_md(_headline(view))}**\n")
    out += [f"- {_md(line)}" for line in view.recommendation.evidence]
    out.append("")
    out += [_md(line) + "\n" for line in _more_lines(view)]
    if snippet := config_snippet(view):
        out.append(f"```python\n{snippet}\n```\n")
    out.append("## Run\n")
    out += [f"- **{k}**: {_md(v)}" for k, v in _facts(view)]
    out += [
        "\n## Ranks\n",
        _md_table(rank_table_rows(view)),
        f"_{_md(rank_table_note(view))}_\n",
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
