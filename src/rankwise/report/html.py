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
    >>> from rankwise.report.summary import rank_table_rows
    >>> from rankwise.report.view import load_run
    >>> from rankwise.storage.store import RunStore
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
import html
import io
import json
from pathlib import Path
from typing import Any

from rankwise.core import metrics
from rankwise.errors import ConfigError
from rankwise.records import COMPLETE, FAILED, SKIPPED
from rankwise.report.plots import (
    answer_figure,
    cost_figure,
    curves_figure,
    forgetting_figure,
    loss_figure,
    pareto_figure,
)
from rankwise.report.summary import (
    PROVISIONAL,
    _facts,
    _headline,
    _more_lines,
    config_snippet,
    rank_table_note,
    rank_table_rows,
    trial_table_rows,
)
from rankwise.report.view import REPORT_FILE, RunView, _view
from rankwise.storage.rundir import ADAPTER_DIR

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
.rec .headline { font-size: 17px; font-weight: 600; }
.rec ul.evidence { margin: 4px 0 8px; padding-left: 20px; }
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


def _facts_html(view: RunView) -> str:
    facts = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _facts(view))
    return f'<section><h2>Run</h2><dl class="facts">{facts}</dl></section>'


def _recommendation_html(view: RunView) -> str:
    """The headline first, then the evidence lines, then what else the search saw."""
    rank = view.recommendation.rank
    banner = "" if view.finished else f'<p class="banner">{_e(PROVISIONAL)}</p>'
    big = f"r = {rank}" if rank is not None else "no recommendation yet"
    items = "".join(f"<li>{_e(line)}</li>" for line in view.recommendation.evidence)
    listed = f'<ul class="evidence">{items}</ul>' if items else ""
    paras = "".join(f"<p>{_e(line)}</p>" for line in _more_lines(view))
    snippet = config_snippet(view)
    code = f"<pre><code>{_e(snippet)}</code></pre>" if snippet else ""
    return (
        f'<section class="rec"><h2>Recommendation</h2>{banner}'
        f'<p class="rank">{_e(big)}</p><p class="headline">{_e(_headline(view))}</p>'
        f"{listed}{paras}{code}</section>"
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
            "Recommended rank vs step",
            answer_figure(view),
            "The recommendation recomputed at every evaluation step from the stored curves, "
            "as if training had stopped there; the grey band is the last quarter of the steps, "
            "where a moving answer says the training budget decides the rank.",
        ),
        (
            "Learning curves",
            curves_figure(view),
            f"Every trial's training loss and validation {score}, coloured by rank.",
        ),
    ]
    if view.forgetting():  # what each rank costs the base model, beside its gain
        figures.insert(1, (
            "Gain and forgetting vs rank",
            forgetting_figure(view),
            "Each rank's share of the improvement over the base model (left) and what it "
            "costs the base model (right): the increase of its loss on the retain set and the "
            "mean KL(base || adapted) of its next-token distributions there.",
        ))  # fmt: skip
    body = [f"<h1>rankwise: {_e(view.name)}</h1>", _recommendation_html(view), _facts_html(view)]
    body += [_figure_html(*f) for f in figures]
    body += [_spectra_html(view)]
    body += [
        f"<section><h2>Ranks</h2>{_html_table(rank_table_rows(view))}"
        f"<p>{_e(rank_table_note(view))}</p></section>",
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
    adapter = view.run_dir / (view.recommendation.adapter_dir or ADAPTER_DIR)
    if not adapter.is_dir():
        return ""
    from rankwise.analysis.spectra import (
        inspect_adapter,  # reads the weights: imports torch, only here
    )
    from rankwise.report.plots import spectra_figure

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
