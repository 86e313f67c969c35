"""Opening a search: the model and data loaded once, the store claimed, the runner built,
and the ranks planned (budgets known in advance applied before any training)."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from rankwise.config import DEFAULT_RANKS, Options
from rankwise.records import TrialKind, TrialResult
from rankwise.run.calibrate import MAX_LR_EXTENSIONS
from rankwise.run.rundir import RunDir, data_fingerprint
from rankwise.run.runner import TrialRunner
from rankwise.search.strategies import plan_ranks

__all__ = ["Session", "open_session", "max_trials", "fairness_warnings"]


@dataclass
class Session:
    """What a search works with once it is open."""

    ctx: object  # rankwise.training.adapter.TrialContext: the model, tokenizer, data
    store: object  # rankwise.run.store.RunStore
    tracker: object
    runner: TrialRunner
    ranks: list[int]
    start_rank: int
    excluded: list[TrialResult] = field(default_factory=list)
    plan_notes: list[str] = field(default_factory=list)


def open_session(opts: Options, run_dir: RunDir, progress, executor, **state) -> Session:
    """Load, check identity, claim the store, build the runner, plan the ranks.

    ``state``: ``baseline_bytes`` and ``elapsed`` for the runner's budgets."""
    from rankwise.io.data import prepare_data, save_tokens
    from rankwise.io.models import check_targets, load_model, param_count, pick_autocast
    from rankwise.report.tracking import make_tracker
    from rankwise.training.adapter import TrialContext

    identity = opts.identity()
    if not opts.run.force:  # refuse a mismatch before loading anything
        run_dir.check_identity(identity, ignore=("data_sha256",))
    labelled = None
    if opts.model.task == "seq-cls":  # labels first: they size the model's head
        from rankwise.training.classify import read_labelled

        labelled = read_labelled(opts.data, opts.train.seed)
    model, tokenizer, device = load_model(opts.model, labelled and labelled.labels)
    ranks = _fit_ranks(opts, model)
    n_params = param_count(model)
    targets = check_targets(model, opts.lora.target_modules, ranks)
    if labelled:
        from rankwise.training.classify import encode

        data = encode(labelled, tokenizer, opts.data.seq_len)
    else:
        data = prepare_data(opts.data, tokenizer, run_dir.path, opts.train.seed)
    identity["data_sha256"] = data_fingerprint(data)
    if not opts.run.force:
        run_dir.check_identity(identity)
    tracker = make_tracker(opts.run.report_to, run_dir.path)
    store = run_dir.open_store(force=opts.run.force)
    if store.claim(identity, force=opts.run.force):
        run_dir.clear_outputs()
    store.set_meta("options", opts.to_flat())
    store.set_meta("name", opts.run.name or run_dir.path.name)
    store.set_meta("data", data.info)
    save_tokens(data, run_dir.path)
    ctx = TrialContext(model, tokenizer, device, data)
    gc.freeze()  # the model's objects are permanent: keep them out of every collection
    runner = TrialRunner(
        opts, run_dir, store, ctx, progress, tracker,
        ranks=ranks,
        targets=targets,
        autocast=pick_autocast(opts.model.dtype, device, n_params),
        execute=executor.execute,
        nested=executor.nested,
        nested_scale=lambda allowed: _nested_scale(opts, allowed),
        **state,
    )  # fmt: skip
    session = Session(ctx, store, tracker, runner, ranks, opts.search.start_rank_for(n_params))
    _plan(session, progress)
    return session


def _plan(session: Session, progress) -> None:
    """Drop the ranks budgets known in advance exclude; clamp the start rank (and say so)."""
    excluded = session.runner.exclude_before_training(session.ranks)
    allowed, session.start_rank, session.plan_notes = plan_ranks(
        session.ranks, session.start_rank, excluded
    )
    for note in session.plan_notes:
        progress.log(note)
    session.excluded = [
        r for r in session.store.results() if r.kind == TrialKind.MAIN and r.rank in excluded
    ]
    session.ranks = session.runner.ranks = allowed


def _fit_ranks(opts: Options, model) -> list[int]:
    """Default rank list: drop ranks the model's layers cannot hold; explicit: check them."""
    from rankwise.io.models import check_targets, linear_module_names

    ranks = opts.search.ranks
    if ranks == DEFAULT_RANKS:
        matched = check_targets(model, opts.lora.target_modules, [1])
        sizes = linear_module_names(model)
        cap = min(min(sizes[n]) for n in matched)
        ranks = [r for r in ranks if r <= cap]
    return ranks


def _nested_scale(opts: Options, ranks: list[int]):
    """The LoRA scale of each drawn rank of a nested run (``--nested-scale``)."""
    from rankwise.training.nested import SharedScale

    if opts.search.nested_scale == "shared":
        return SharedScale.middle(ranks, opts.lora.scaling)
    return opts.lora.scaling


def max_trials(opts: Options, ranks: list[int]) -> int:
    """An upper bound on the trials a search may train (for progress)."""
    s, tc = opts.search, opts.train
    curves = 1 + len(s.compare_targets or [])
    n = len(ranks) * s.seeds * curves + (s.max_seeds > s.seeds) * 2 * (s.max_seeds - s.seeds)
    if tc.lr is None:
        n += (len(tc.lr_candidates) + 2 * MAX_LR_EXTENSIONS) * (
            2 if tc.lr_check_largest_rank else 1
        )
    if s.tune:
        n += 2 * (2 * ("dropout" in s.tune) + 4 * ("alpha" in s.tune))
    return n + (s.strategy == "nested" and s.final) + 2 * s.seeds * s.per_layer


def fairness_warnings(opts: Options, ctx=None) -> list[str]:
    """Settings that make the rank comparison unfair, said before the search spends time."""
    out = []
    if opts.lora.alpha_policy == "ratio":
        out.append(
            f"--alpha-policy ratio: lora_alpha = {opts.lora.alpha_ratio:g}*r, so under "
            "Adam a higher rank also acts like a larger learning rate; gains on the curve mix "
            "capacity with step size (--alpha-policy fixed compares capacity)"
        )
    n_val = ctx.data.val_ids.shape[0] if ctx is not None else None
    if opts.train.metric != "loss" and n_val and n_val < 200:
        out.append(
            f"--metric {opts.train.metric}: {n_val} validation examples, so the score "
            f"moves in steps of about {1 / n_val:.1%}; a larger --val set makes the rank "
            "curve finer"
        )
    return out
