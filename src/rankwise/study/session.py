"""Opening a search: the model and data loaded once, the store claimed, the runner built,
and the ranks planned (budgets known in advance applied before any training)."""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from rankwise.config import DEFAULT_RANKS, Options, SearchConfig
from rankwise.core.strategies import plan_ranks
from rankwise.records import TrialKind, TrialResult
from rankwise.run.calibrate import MAX_LR_EXTENSIONS
from rankwise.run.runner import TrialRunner
from rankwise.storage.rundir import RunDir, data_fingerprint

__all__ = ["Session", "open_session", "max_trials", "fairness_warnings", "apply_budget"]


@dataclass
class Session:
    """What a search works with once it is open."""

    ctx: object  # rankwise.training.adapter.TrialContext: the model, tokenizer, data
    store: object  # rankwise.storage.store.RunStore
    tracker: object
    runner: TrialRunner
    ranks: list[int]
    start_rank: int
    excluded: list[TrialResult] = field(default_factory=list)
    plan_notes: list[str] = field(default_factory=list)
    budget: dict = field(default_factory=dict)  # the trial budget (apply_budget)


def open_session(opts: Options, run_dir: RunDir, progress, executor, **state) -> Session:
    """Load, check identity, claim the store, build the runner, plan the ranks.

    ``state``: ``baseline_bytes`` and ``elapsed`` for the runner's budgets."""
    from rankwise.io.data import prepare_data, save_tokens
    from rankwise.io.experts import resolve_target_parameters
    from rankwise.io.models import check_targets, load_model, param_count, pick_autocast
    from rankwise.report.tracking import make_tracker
    from rankwise.training.adapter import TrialContext

    identity = opts.identity()
    if not opts.run.force:  # refuse a mismatch before loading anything
        run_dir.check_identity(identity, ignore=("data_sha256", "retain_sha256"))
    retain_records = _check_retain(opts)  # an unreadable --retain is refused before loading
    labelled = None
    if opts.model.task == "seq-cls":  # labels first: they size the model's head
        from rankwise.training.classify import read_labelled

        labelled = read_labelled(opts.data, opts.train.seed)
    model, tokenizer, device = load_model(opts.model, labelled and labelled.labels)
    parameters = resolve_target_parameters(model, opts.lora.target_parameters)
    ranks = _fit_ranks(opts, model, parameters)
    n_params = param_count(model)
    targets = check_targets(model, opts.lora.target_modules, ranks, parameters)
    if labelled:
        from rankwise.training.classify import encode

        data = encode(labelled, tokenizer, opts.data.seq_len)
    else:
        data = prepare_data(opts.data, tokenizer, run_dir.path, opts.train.seed)
    identity["data_sha256"] = data_fingerprint(data)
    autocast = pick_autocast(opts.model.dtype, device, n_params)
    retain = _open_retain(opts, run_dir, (model, tokenizer, device, autocast), retain_records)
    identity["retain_sha256"] = retain and retain[0].sha256
    budget = apply_budget(opts, int(data.train_ids.shape[0]))
    if opts.train.epochs or opts.search.trial_budget < 1:
        progress.log(f"trial budget: {budget['holds_for']}; the answer holds for this budget")
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
        parameters=parameters,
        autocast=autocast,
        forgetting=_keep_retain(opts, run_dir, store, ctx, retain, progress),
        execute=executor.execute,
        resident=executor.resident_bytes,
        nested=executor.nested,
        nested_scale=lambda allowed: _nested_scale(opts, allowed),
        **state,
    )  # fmt: skip
    session = Session(ctx, store, tracker, runner, ranks, opts.search.start_rank_for(n_params))
    session.budget = budget
    _plan(session, progress)
    return session


def _check_retain(opts: Options) -> tuple | None:
    """Refuse retain options that do not go together, and read a --retain file now."""
    from rankwise.training.retain import check_retain_options, read_retain_records

    check_retain_options(opts)
    return read_retain_records(opts)


def _open_retain(opts: Options, run_dir: RunDir, loaded: tuple, records):
    """(the retain set, its cache key), or None with --no-retain (rankwise.training.retain)."""
    from rankwise.training.retain import prepare_retain

    model, tokenizer, device, autocast = loaded
    retain, key = prepare_retain(opts, model, tokenizer, device, autocast, run_dir.retain, records)
    return None if retain is None else (retain, key)


def _keep_retain(opts: Options, run_dir: RunDir, store, ctx, retain, progress):
    """Cache the retain set, record it, and measure every trial's forgetting on it."""
    if retain is None:
        store.set_meta("retain", None)
        return None
    from rankwise.training.retain import SELF_SAMPLED, Forgetting

    retain_set, key = retain
    what = "sampled from the base model" if retain_set.source == SELF_SAMPLED else retain_set.source
    progress.log(
        f"retain set: {retain_set.ids.shape[0]} x {retain_set.ids.shape[1]} tokens {what} "
        f"(base model loss {retain_set.base_loss:.4f}; {retain_set.seconds:.1f}s)"
    )
    retain_set.save(run_dir.retain, key)
    store.set_meta("retain", retain_set.info())
    return Forgetting(retain_set, ctx, run_dir, opts.search.max_forgetting)


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


def _fit_ranks(opts: Options, model, parameters: list[str] | None) -> list[int]:
    """Default rank list: drop ranks the model's layers cannot hold; explicit: check them."""
    from rankwise.io.models import check_targets, rank_cap

    ranks = opts.search.ranks
    if ranks == DEFAULT_RANKS or ranks == SearchConfig(serve=opts.search.serve).ranks:
        matched = check_targets(model, opts.lora.target_modules, [1], parameters)
        cap = rank_cap(model, matched, parameters)
        ranks = [r for r in ranks if r <= cap]
    return ranks


def apply_budget(opts: Options, train_blocks: int) -> dict:
    """Resolve a trial's steps once the data is packed: --epochs over ``train_blocks``, times
    --trial-budget; --warmup-ratio becomes steps, and --warmup-steps shrinks with the budget
    so the schedule keeps its shape (as do the schedule's own step counts). Sets
    ``opts.train.max_steps`` and returns the budget as recommendation.json records it, with
    its schedule and ``holds_for``: which budget the answer is for.

    >>> o = Options.from_flat({"epochs": 2, "batch_size": 4, "trial_budget": 0.25,
    ...                        "warmup_ratio": 0.1, "lr_scheduler": "cosine"})
    >>> print(apply_budget(o, train_blocks=400)["holds_for"])
    50 steps, cosine schedule: 0.25 of 2 epochs (200 steps)
    >>> o.train.max_steps, o.train.warmup_steps
    (50, 5)
    """
    import math

    tc, share = opts.train, opts.search.trial_budget
    per_epoch = max(1, math.ceil(train_blocks / (tc.batch_size * tc.grad_accum)))
    full = math.ceil(tc.epochs * per_epoch) if tc.epochs else tc.max_steps
    tc.max_steps = max(1, math.ceil(full * share))
    if tc.warmup_ratio is not None:
        tc.warmup_steps = math.ceil(tc.warmup_ratio * tc.max_steps)
    elif share < 1:
        tc.warmup_steps = max(0, min(tc.max_steps - 1, round(tc.warmup_steps * share)))
    _shrink_schedule(tc, share)
    whole = f"{tc.epochs:g} epochs ({full} steps)" if tc.epochs else f"{full} steps"
    of = "the recipe's " if opts.run.recipe else ""
    holds = f"{tc.max_steps} steps, {tc.lr_scheduler} schedule"
    holds += f": {share:g} of {of}{whole}" if share < 1 else ""
    if share == 1 and tc.epochs:
        holds += f": {whole}"
    return {"full_steps": full, "trial_budget": share, "epochs": tc.epochs, "holds_for": holds,
            **_schedule_record(tc)}  # fmt: skip


def _shrink_schedule(tc, share: float) -> None:
    """The schedule's own step counts (warmup_stable_decay's num_decay_steps, ...) times
    --trial-budget, as the warm-up: a trial of part of the budget keeps the schedule's shape."""
    from rankwise.config.schedules import STEP_ARGUMENTS

    kwargs = tc.lr_scheduler_kwargs
    if share < 1 and kwargs and any(k in kwargs for k in STEP_ARGUMENTS):
        # A new dict: the identity checked against the store holds the one given.
        tc.lr_scheduler_kwargs = {
            k: max(1, round(v * share)) if k in STEP_ARGUMENTS and isinstance(v, int) else v
            for k, v in kwargs.items()
        }


def _schedule_record(tc) -> dict:
    """How each trial's rate moves and its embeddings are noised, as the export writes it."""
    return {
        "lr_scheduler": tc.lr_scheduler,
        "lr_scheduler_kwargs": tc.schedule_kwargs(),
        "warmup_steps": tc.warmup_steps,
        "neftune_alpha": tc.neftune_alpha,
    }


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
    if opts.run.recipe:  # what the recipe trains that the trials cannot (named once)
        from rankwise.io.recipes import read_recipe

        out += read_recipe(opts.run.recipe).warnings
    n_val = ctx.data.val_ids.shape[0] if ctx is not None else None
    if opts.train.metric != "loss" and n_val and n_val < 200:
        out.append(
            f"--metric {opts.train.metric}: {n_val} validation examples, so the score "
            f"moves in steps of about {1 / n_val:.1%}; a larger --val set makes the rank "
            "curve finer"
        )
    return out
