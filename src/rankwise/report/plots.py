"""The report's figures, drawn with matplotlib from a :class:`~rankwise.report.html.RunView`.

matplotlib is imported only when a figure is drawn, through ``Figure`` (no pyplot: no
global state, no GUI backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rankwise.core.metrics import label as metric_label
from rankwise.core.metrics import shown
from rankwise.core.scores import RankScore
from rankwise.errors import ConfigError
from rankwise.records import COMPLETE, FAILED, SKIPPED, TrialKind

if TYPE_CHECKING:
    from rankwise.analysis.spectra import AdapterSpectra
    from rankwise.report.view import RunView

__all__ = [
    "loss_figure",
    "cost_figure",
    "pareto_figure",
    "curves_figure",
    "spectra_figure",
    "write_heatmap",
    "forgetting_figure",
]


def _figure(ncols: int = 1, width: float = 10.0, height: float = 4.6) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _rank_axis(ax: Any, ranks: list[int]) -> None:
    """A log2 x axis with a tick at every rank: ranks are (usually) powers of two."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.set_xlim(min(ranks) / 1.5, max(ranks) * 1.5)
    ax.set_xlabel("LoRA rank r")
    ax.grid(alpha=0.3)


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#777")
    ax.set_xticks([])
    ax.set_yticks([])


def loss_figure(view: RunView) -> Any:
    """(a) Best val loss vs rank, the base model's loss, the band of ranks as good as the best,
    the recommended rank, unfinished ranks on top."""
    fig, (ax,) = _figure()
    ok = [s for s in view.scores if s.ok]
    if ok:
        _plot_losses(ax, view, ok)
    else:
        _no_data(ax, "no trial has completed yet")
    _mark_unfinished(ax, view)
    _rank_axis(ax, view.ranks())
    ax.set_ylabel(_score_label(view))
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9)  # off the data
    return fig


def _score_label(view: RunView) -> str:
    """'best validation loss', or the metric's name (scores are shown as users read them)."""
    return "best validation loss" if view.metric == "loss" else f"best {metric_label(view.metric)}"


def _plot_losses(ax: Any, view: RunView, ok: list[RankScore]) -> None:
    """Scores as users read them: a metric's error 1 - m is drawn as m (higher is better)."""
    m = view.metric
    several = any(s.n > 1 for s in ok)
    ax.errorbar(
        [s.rank for s in ok],
        [shown(m, s.mean) for s in ok],
        yerr=[s.se for s in ok] if several else None,
        fmt="o-",
        capsize=4,
        color="tab:blue",
        label="mean ± SE over seeds" if several else _score_label(view),
    )
    done = [r for r in view.results if r.ok]
    if several:
        ax.plot(
            [r.rank for r in done],
            [shown(m, r.best_val_loss) for r in done],
            ".",
            color="tab:blue",
            alpha=0.4,
            label="one seed",
        )
    if nested := [r for r in done if r.kind == TrialKind.NESTED]:
        ax.plot(
            [r.rank for r in nested],
            [shown(m, r.best_val_loss) for r in nested],
            "s",
            mfc="none",
            ms=10,
            color="tab:purple",
            label="nested-rank training",
        )
    best = min(s.mean for s in ok)
    if (limit := view.good_limit()) is not None:
        ax.axhspan(
            shown(m, best),
            shown(m, limit),
            color="tab:green",
            alpha=0.18,
            label=view.criterion.resolve(view.base_loss).describe(),
        )
    if view.base_loss is not None:
        ax.axhline(
            shown(m, view.base_loss),
            ls="--",
            color="tab:gray",
            label=f"base model, no adapter ({shown(m, view.base_loss):.4f})",
        )
    if pick := next((s for s in ok if s.rank == view.recommendation.rank), None):
        label = f"recommended r={pick.rank}" + ("" if view.finished else " (provisional)")
        ax.plot(
            [pick.rank], [shown(m, pick.mean)], "*", ms=20, color="tab:red", label=label, zorder=5
        )
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi + 0.2 * (hi - lo))  # headroom for the markers of unfinished ranks


_UNFINISHED = {FAILED: ("x", "tab:red"), SKIPPED: ("x", "tab:orange"), "running": ("o", "tab:gray")}


def _mark_unfinished(ax: Any, view: RunView) -> None:
    """Ranks without a loss (failed, skipped, running) as labelled markers along the top."""
    oom = {r.rank for r in view.results if r.out_of_memory}
    marks = [
        (s.rank, s.status, "out of memory" if s.rank in oom else s.status)
        for s in view.scores
        if not s.ok
    ]
    scored = {s.rank for s in view.scores}
    marks += [
        (r, "running", "running")
        for r in sorted({int(t["rank"]) for t in view.running})
        if r not in scored
    ]
    top = ax.get_xaxis_transform()  # x in data units, y as a fraction of the axes
    labelled = set()
    for rank, status, text in marks:
        kind = status if status in _UNFINISHED else FAILED
        marker, color = _UNFINISHED[kind]
        ax.plot(
            [rank],
            [0.94],
            marker=marker,
            ms=10,
            mew=2.5,
            mfc="none",
            color=color,
            ls="none",
            transform=top,
            label=None if kind in labelled else kind,
        )
        ax.annotate(
            text,
            (rank, 0.94),
            xycoords=top,
            xytext=(0, -15),
            textcoords="offset points",
            ha="center",
            fontsize=8,
            color=color,
        )
        labelled.add(kind)


_COSTS = [
    ("trainable_params", "trainable parameters", 1.0),
    ("peak_memory_bytes", "peak memory (MiB)", 2.0**20),
    ("wall_seconds", "wall time (s)", 1.0),
]


def cost_figure(view: RunView) -> Any:
    """(b) Trainable params, peak memory and wall time per rank, predicted beside measured."""
    fig, axes = _figure(3, 12.0, 3.8)
    for ax, (key, title, unit) in zip(axes, _COSTS, strict=True):
        measured = [
            (r.rank, getattr(r, key) / unit)
            for r in view.results
            if r.status == COMPLETE and getattr(r, key)
        ]
        failed = [
            (r.rank, getattr(r, key) / unit)
            for r in view.results
            if r.status == FAILED and getattr(r, key)
        ]
        predicted = [
            (r.rank, r.predicted[key] / unit) for r in view.results if r.predicted.get(key)
        ]
        _mean_line(ax, measured, label="measured", color="tab:blue", marker="o")
        _mean_line(ax, failed, label="failed trial", color="tab:red", marker="x", ls="none")
        _mean_line(
            ax, predicted, label="predicted", color="tab:orange", marker="o", mfc="none", ls="--"
        )
        if measured or predicted:
            ax.legend(fontsize=8)
            if key == "trainable_params":  # doubles with r: a straight line on log2-log2
                _log2_counts(ax.yaxis)
        else:
            _no_data(ax, "nothing measured yet")
        _rank_axis(ax, view.ranks())
        ax.set_title(title, fontsize=11)
    return fig


def _log2_counts(axis: Any) -> None:
    from matplotlib.ticker import EngFormatter, LogLocator, NullLocator

    axis.axes.set_yscale("log", base=2)
    axis.set_major_locator(LogLocator(base=2))
    axis.set_major_formatter(EngFormatter(places=0, sep=""))
    axis.set_minor_locator(NullLocator())


def _mean_line(ax: Any, points: list[tuple[int, float]], **style: Any) -> None:
    by_rank: dict[int, list[float]] = {}
    for rank, value in points:
        by_rank.setdefault(rank, []).append(value)
    if by_rank:
        ranks = sorted(by_rank)
        ax.plot(ranks, [sum(by_rank[r]) / len(by_rank[r]) for r in ranks], **style)


def _pareto(points: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """Points (params, loss, rank) that no other point beats on both size and loss."""
    front, best = [], float("inf")
    for p in sorted(points):
        if p[1] < best:
            front.append(p)
            best = p[1]
    return front


def pareto_figure(view: RunView) -> Any:
    """(c) Each rank's val loss against its trainable parameters, with the Pareto front."""
    fig, (ax,) = _figure(height=4.2)
    params = {r.rank: r.trainable_params for r in view.results if r.trainable_params}
    points = [(params[s.rank], s.mean, s.rank) for s in view.scores if s.ok and s.rank in params]
    if not points:
        _no_data(ax, "no completed trial yet")
        return fig
    front = _pareto(points)
    m = view.metric
    points = [(x, shown(m, y), rank) for x, y, rank in points]
    front = [(x, shown(m, y), rank) for x, y, rank in front]
    ax.step(
        [p[0] for p in front],
        [p[1] for p in front],
        where="post",
        color="tab:green",
        label="Pareto front",
    )
    ax.plot([p[0] for p in points], [p[1] for p in points], "o", color="tab:blue", label="rank")
    for x, y, rank in points:
        ax.annotate(f"r={rank}", (x, y), xytext=(5, 5), textcoords="offset points", fontsize=8)
        if rank == view.recommendation.rank:
            ax.plot([x], [y], "*", ms=18, color="tab:red", label="recommended", zorder=5)
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=_score_label(view))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    return fig


def curves_figure(view: RunView) -> Any:
    """(d) Train and val loss curves of every trial, coloured by rank."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    fig, axes = _figure(2, 12.0, 4.2)
    m = view.metric
    val = "validation loss" if m == "loss" else f"validation {metric_label(m)}"
    for ax, title in zip(axes, ("training loss", val), strict=True):
        ax.set(
            title=title, xlabel="step", ylabel="loss" if title.endswith("loss") else metric_label(m)
        )
        ax.grid(alpha=0.3)
    trials = sorted(
        (r for r in view.results if r.train_curve or r.val_curve), key=lambda r: (r.rank, r.seed)
    )
    if not trials:
        for ax in axes:
            _no_data(ax, "no learning curve recorded yet")
        return fig
    ranks = sorted({r.rank for r in trials})
    # vmax past the largest rank: viridis' last yellow is hard to see on white.
    norm, cmap = LogNorm(min(ranks) / 1.5, max(ranks) * 2.5), colormaps["viridis"]
    for r in trials:
        style = {
            "color": cmap(norm(r.rank)),
            "lw": 1.3,
            "alpha": 0.85,
            "ls": "--" if r.kind == TrialKind.NESTED else "-",
        }
        val_curve = [(step, shown(m, v)) for step, v in r.val_curve]
        for ax, curve, marker in ((axes[0], r.train_curve, ""), (axes[1], val_curve, "o")):
            if curve:
                ax.plot([p[0] for p in curve], [p[1] for p in curve], marker=marker, ms=3, **style)
    bar = fig.colorbar(ScalarMappable(norm, cmap), ax=axes, label="rank r", pad=0.01)
    bar.set_ticks(ranks, labels=[str(r) for r in ranks])
    bar.minorticks_off()
    return fig


def spectra_figure(spectra: AdapterSpectra) -> Any:
    """(e) Heat map of an adapter's effective rank (90% energy) by layer × module type."""
    import numpy as np

    rows = {(r["layer"], r["type"]): r for r in spectra.summary()}
    kinds = list(dict.fromkeys(m.kind for m in spectra.modules))
    layers = list(dict.fromkeys(m.layer for m in spectra.modules))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), row in rows.items():
        grid[layers.index(layer), kinds.index(kind)] = row["effective_rank_90"]
    top = max(m.rank for m in spectra.modules)
    fig, (ax,) = _figure(
        width=min(14.0, max(5.5, 2.4 + 1.1 * len(kinds))), height=1.8 + 0.32 * len(layers)
    )
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top)
    if len(layers) * len(kinds) <= 400:  # numbers stay legible up to about 20 × 20 cells
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                color = "white" if value < 0.6 * top else "black"
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), ["-" if x is None else str(x) for x in layers])
    ax.set(xlabel="module type", ylabel="layer")
    ax.set_title(f"effective rank at 90% of each update's energy (r ≤ {top})", fontsize=10)
    fig.colorbar(image, ax=ax, label="effective rank @90%")
    return fig


def write_heatmap(spectra: AdapterSpectra, path: str | Path) -> Path:
    """Save the effective-rank heat map (:func:`rankwise.report.plots.spectra_figure`) as a PNG."""
    path = Path(path)
    try:
        spectra_figure(spectra).savefig(path, dpi=110)
    except (OSError, ValueError) as exc:  # ValueError: a file extension matplotlib cannot write
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        raise ConfigError(f"--figure: cannot write {path} ({reason})") from None
    return path


def answer_figure(view: RunView) -> Any:
    """(e) The recommended rank at every evaluation step, recomputed from the stored curves:
    where the answer still moves late, the training budget decides the rank."""
    fig, (ax,) = _figure(1, 10.0, 3.4)
    steps = [a for a in view.recommendation.answer_by_step if a.get("rank")]
    ax.set(title="recommended rank vs step", xlabel="step", ylabel="rank")
    if not steps:
        _no_data(ax, "no answer yet")
        return fig
    ax.step([a["step"] for a in steps], [a["rank"] for a in steps], where="post", color="#1f77b4")
    ax.plot([a["step"] for a in steps], [a["rank"] for a in steps], "o", color="#1f77b4")
    ax.set_yscale("log", base=2)
    ranks = sorted({a["rank"] for a in steps})
    ax.set_yticks(ranks, [str(r) for r in ranks])
    ax.axvspan(steps[-1]["step"] * 0.75, steps[-1]["step"], color="#eee", zorder=0)
    ax.grid(alpha=0.3)
    return fig


def forgetting_figure(view: RunView) -> Any:
    """The gain and the cost of each rank on one figure: its share of the improvement over
    the base model (left axis) and its forgetting, the retain-loss increase (right axis),
    with ``--max-forgetting`` and the recommended rank."""
    fig, (ax,) = _figure(height=4.0)
    drift = view.forgetting()
    shares = [(s.rank, view.share(s.mean)) for s in view.scores if s.ok]
    shares = [(r, 100 * v) for r, v in shares if v is not None]
    if shares:
        ax.plot(*zip(*shares, strict=True), "o-", color="tab:blue", label="share of improvement")
    ax.set_ylabel("share of the improvement over the base model (%)", color="tab:blue")
    cost = ax.twinx()
    if drift:
        ranks = list(drift)
        cost.plot(ranks, [drift[r]["forgetting"] for r in ranks], "s--", color="tab:red",
                  label="forgetting (retain-loss increase)")  # fmt: skip
        kl = [(r, d["forgetting_kl"]) for r, d in drift.items() if d["forgetting_kl"] is not None]
        if kl:
            cost.plot(*zip(*kl, strict=True), "^:", color="tab:orange", label="KL(base || adapted)")
    limit = view.options.get("max_forgetting")
    if limit is not None:
        cost.axhline(limit, color="tab:red", alpha=0.5, label=f"--max-forgetting {limit:g}")
    cost.set_ylabel("nats per retain token", color="tab:red")
    if (pick := view.recommendation.rank) is not None:
        ax.axvline(pick, color="tab:green", alpha=0.4, lw=6, label=f"recommended r={pick}")
    if not shares and not drift:
        _no_data(ax, "no trial measured yet")
    _rank_axis(ax, view.ranks())
    handles = [h for a in (ax, cost) for h in a.get_legend_handles_labels()[0]]
    if handles:
        fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    return fig
