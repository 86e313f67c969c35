"""One trial lifecycle: attach a fresh adapter → train → evaluate → keep the best → detach.

``run_trial(spec) -> TrialResult`` is a function of a serialisable
:class:`~rankwise.records.TrialSpec`; the loaded model and token blocks are a
per-process cache (:class:`TrialContext`), so the same call works in-process (the
search passes its context) or on a remote worker (which loads them from the spec).
Every training run of rankwise goes through :func:`run_lifecycle`: ordinary trials,
the nested-rank run (:mod:`rankwise.nested` plugs in through :class:`Hooks`) and the
timing runs of ``estimate --calibrate``.

Fairness: every rank sees the same token blocks in the same order (a generator
seeded with ``spec.train.seed``), the same schedule, steps and evaluation points, and
the adapter is initialised after ``torch.manual_seed(spec.seed)``.

The base model is left exactly as it was (:func:`attached`): the modules PEFT wrapped
are put back, and every base parameter the adapter made trainable (biases under
``bias="all"|"lora_only"``, ``modules_to_save``) is restored bit for bit — also when
injection or training fails half-way.

The loss of an optimizer step is the sum of the token losses of its micro-batches
divided by the number of loss tokens in all of them (transformers'
``num_items_in_batch``), so ``grad_accum=2 × batch 4`` is the same update as ``batch 8``
even when masks leave different numbers of loss tokens per micro-batch.
A classifier (``spec.model["task"] == "seq-cls"``) has one label per block instead of one
per token (:mod:`rankwise.classify`); its evaluations measure loss, accuracy and macro-F1,
and the trial is scored by the one ``spec.train.metric`` names (:mod:`rankwise.metrics`).
"""

from __future__ import annotations

import gc
import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ConfigError
from .records import COMPLETE, FAILED, OUT_OF_MEMORY, TrialResult, TrialSpec
from .resources import PeakMemory

__all__ = [
    "TrialContext",
    "Hooks",
    "Run",
    "run_trial",
    "run_lifecycle",
    "attached",
    "attach_adapter",
    "evaluate",
    "validation_loss",
    "validation_scores",
    "lora_config",
    "task_type",
    "failure_reason",
]

Progress = Callable[[int, int, float], None]


@dataclass
class TrialContext:
    """What a trial needs beyond its spec: the loaded base model and the token blocks."""

    model: torch.nn.Module
    tokenizer: object
    device: str
    data: object  # rankwise.data.TokenData

    @classmethod
    def for_spec(cls, spec: TrialSpec) -> TrialContext:
        """Load (once per process) the model and cached tokens a spec names."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from .config import ModelConfig
        from .data import TokenData
        from .models import load_model

        key = (repr(sorted(spec.model.items())), spec.data_dir)
        cache = _PROCESS_CACHE.get(key)
        if cache is None:
            path = f"{spec.data_dir}/tokens.safetensors"
            with safe_open(path, "pt") as f:
                info = json.loads((f.metadata() or {}).get("info") or "{}")
            model, tokenizer, device = load_model(ModelConfig(**spec.model), info.get("labels"))
            t = load_file(path)
            data = TokenData(t["train_ids"], t["train_labels"], t["val_ids"], t["val_labels"], info)
            cache = _PROCESS_CACHE[key] = cls(model, tokenizer, device, data)
            gc.freeze()  # the model's objects are permanent: keep them out of every collection
        return cache


_PROCESS_CACHE: dict = {}


def lora_config(spec: TrialSpec):
    """The spec's ``LoraConfig``. For a classifier, PEFT's SEQ_CLS task type puts the head
    (``classifier``/``score``) in ``modules_to_save``: trained beside the adapter, saved with it."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type(spec.model.get("task")), **spec.lora.kwargs())


def task_type(task: str | None) -> str:
    """PEFT's task type for ``--task``."""
    return "SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM"


def _is_seq_cls(spec: TrialSpec) -> bool:
    return spec.model.get("task") == "seq-cls"


def attach_adapter(model: torch.nn.Module, spec: TrialSpec):
    """A fresh PEFT adapter on ``model`` (seeded init), left attached: for inspection and
    tests. Trials use :func:`attached`, which also takes it off again."""
    from peft import get_peft_model

    from .quantize import without_bitsandbytes

    torch.manual_seed(spec.seed)
    with without_bitsandbytes():  # PEFT's dispatch would import it for nothing
        return get_peft_model(model, lora_config(spec))


# -- attach and detach, leaving the base exactly as it was -----------------------------------
@contextmanager
def attached(model: torch.nn.Module, spec: TrialSpec) -> Iterator:
    """A fresh PEFT adapter on ``model`` (seeded init) for the duration of the block.

    On exit, whatever happened inside (or inside ``get_peft_model``): every module PEFT
    replaced is put back, every base parameter the adapter made trainable gets its
    values and its ``requires_grad`` back, and ``model`` holds no PEFT state.
    """
    from peft import get_peft_model

    from .quantize import without_bitsandbytes

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    grad_flags = {name: p.requires_grad for name, p in params.items()}
    snapshot: dict[str, torch.Tensor] = {}
    torch.manual_seed(spec.seed)
    try:
        # PEFT's dispatch would import bitsandbytes for nothing on a plain base; a stray
        # pattern key is an error below, named once (PEFT would also warn).
        with warnings.catch_warnings(), without_bitsandbytes():
            warnings.filterwarnings("ignore", message="The following .*_pattern keys did not")
            peft_model = get_peft_model(model, lora_config(spec))
        _verify_patterns(peft_model, spec)
        snapshot = {name: p.detach().clone() for name, p in params.items() if p.requires_grad}
        yield peft_model
    finally:
        _put_back(model, modules)
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)
        for name, p in params.items():
            p.requires_grad_(grad_flags[name])
        if hasattr(model, "peft_config"):
            del model.peft_config


def _verify_patterns(peft_model, spec: TrialSpec) -> None:
    """A rank/alpha pattern key that matched nothing is a user error, not a trial failure:
    PEFT only warns (peft#3582), so read back what it built (rankwise.patterns)."""
    if spec.lora.rank_pattern or spec.lora.alpha_pattern:
        from .patterns import verify_ranks

        verify_ranks(peft_model, peft_model.peft_config["default"])


def _warm_start(peft_model, folder: str) -> None:
    """Start from a saved adapter's weights (a PEFT folder of the same rank and targets):
    e.g. the final trial of a nested search starts from the nested run's truncation."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(f"init adapter {folder}: no adapter_model.safetensors there")
    state = load_file(str(path))
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ConfigError(
            f"init adapter {folder}: does not match the trial's adapter "
            f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})"
        )


def _put_back(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
    """Re-seat every recorded module at its path (undoes PEFT's wrappers and LoRA layers)."""
    for path, module in modules.items():
        if not path:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        if parent._modules.get(name) is not module:
            parent._modules[name] = module


# -- the one training loop and its hooks ------------------------------------------------------
@dataclass
class Run:
    """Mutable state of one training run (the lifecycle fills it; hooks read it)."""

    spec: TrialSpec
    train_curve: list[tuple[int, float]] = field(default_factory=list)
    val_curve: list[tuple[int, float]] = field(default_factory=list)
    best: tuple[float, int] | None = None
    best_state: dict | None = None
    tokens: int = 0
    step: int = 0
    trainable: int | None = None
    time_limited: bool = False
    early_stopped: bool = False
    first_step_at: float | None = None
    last_step_at: float | None = None
    started_at: float = field(default_factory=time.perf_counter)
    status: str = COMPLETE
    reason: str = ""
    peak_bytes: int | None = None
    scores: list[tuple[int, dict]] = field(default_factory=list)
    best_scores: dict = field(default_factory=dict)

    def record_eval(self, peft_model, loss: float, scores: dict | None = None) -> bool:
        """Add a validation point; keep the adapter's state if it is the best so far.

        ``loss`` is the objective (lower is better: the loss, or 1 - metric); ``scores``,
        when the task has more than a loss, every metric measured (rankwise.metrics)."""
        self.val_curve.append((self.step, loss))
        if scores:
            self.scores.append((self.step, scores))
        if math.isfinite(loss) and (self.best is None or loss < self.best[0]):
            self.best = (loss, self.step)
            self.best_scores = dict(scores or {})
            # The adapter delivered is the best checkpoint, so it reproduces the score.
            self.best_state = trainable_state(peft_model)
            return True
        return False

    @property
    def wall_seconds(self) -> float:
        return time.perf_counter() - self.started_at

    @property
    def step_seconds(self) -> float | None:
        """Seconds per optimizer step, the first (warm-up) step not counted."""
        if not self.first_step_at or self.step < 2:
            return None
        return (self.last_step_at - self.first_step_at) / (self.step - 1)


def trainable_state(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad}


class Hooks:
    """Where a variant of training plugs into the lifecycle; the defaults are a plain trial.

    The nested-rank run (:mod:`rankwise.nested`) overrides them to draw a rank per step,
    evaluate every truncation and save one adapter per rank.
    """

    def attached(self, peft_model, run: Run) -> None:
        """Called once the adapter is on the model, before the first step."""

    def step(self, peft_model, step: int):
        """A context manager around one step's forward and backward passes."""
        return nullcontext()

    def optimizer_step(self, peft_model, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def evaluate(self, peft_model, run: Run, ctx: TrialContext) -> None:
        if not _is_seq_cls(run.spec):
            run.record_eval(peft_model, validation_loss(peft_model, ctx, run.spec))
            return
        from .metrics import objective

        scores = validation_scores(peft_model, ctx, run.spec)
        run.record_eval(peft_model, objective(scores, run.spec.train.metric), scores)

    def save(self, peft_model, run: Run) -> None:
        """Write the best checkpoint as a PEFT adapter folder."""
        if run.best_state is None:
            return
        with torch.no_grad():
            named = dict(peft_model.named_parameters())
            for k, v in run.best_state.items():
                named[k].copy_(v)
        peft_model.save_pretrained(run.spec.adapter_dir)

    def results(self, run: Run) -> list[TrialResult]:
        return [trial_result(run)]


def run_lifecycle(
    spec: TrialSpec,
    ctx: TrialContext,
    hooks: Hooks | None = None,
    progress: Progress | None = None,
) -> list[TrialResult]:
    """Attach → train → evaluate → keep the best → save → detach. Failures (OOM, NaN,
    errors) become failed results; the base model is restored in every case."""
    hooks = hooks or Hooks()
    run = Run(spec)
    peak = PeakMemory(ctx.device)
    try:
        with peak, attached(ctx.model, spec) as peft_model:
            if spec.train.init_adapter:
                _warm_start(peft_model, spec.train.init_adapter)
            hooks.attached(peft_model, run)
            # Counted after the hook: a data-driven init (EVA) may change every module's rank.
            run.trainable = peft_model.get_nb_trainable_parameters()[0]
            _fit(peft_model, run, ctx, hooks, progress)
            if spec.adapter_dir:
                hooks.save(peft_model, run)
    except ConfigError:  # a bad pattern: the user's to fix, every trial would fail alike
        raise
    except Exception as exc:  # a failed trial is a record, not the end of the search
        run.status, run.reason = FAILED, failure_reason(exc, peak)
    finally:
        run.best_state = None
        if run.status != COMPLETE or ctx.device.startswith("cuda"):
            # A full collection costs ~0.5 s with a model loaded; refcounting frees a normal
            # trial's tensors, so collect only where memory must come back now.
            gc.collect()
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
    run.peak_bytes = int(peak.bytes) if peak.bytes else None
    return hooks.results(run)


def run_trial(
    spec: TrialSpec, ctx: TrialContext | None = None, progress: Progress | None = None
) -> TrialResult:
    """Train and evaluate one adapter: the plain lifecycle, or with EVA's data-driven
    initialisation when the spec asks for ``init_lora_weights="eva"``."""
    ctx = ctx or TrialContext.for_spec(spec)
    hooks = None
    if spec.lora.init_lora_weights == "eva":
        from .perlayer import EvaInit

        hooks = EvaInit(ctx)
    return run_lifecycle(spec, ctx, hooks, progress)[0]


def _fit(peft_model, run: Run, ctx: TrialContext, hooks: Hooks, progress: Progress | None):
    tc = run.spec.train
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(tc.warmup_steps, tc.max_steps))
    batches = _Batches(ctx.data.train_ids.shape[0], tc.batch_size, tc.seed)
    loss_fn = _loss_fn(run.spec)
    peft_model.train()
    for step in range(1, tc.max_steps + 1):
        with hooks.step(peft_model, step):
            loss, tokens = _train_step(peft_model, batches, ctx, tc, loss_fn)
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}")
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        hooks.optimizer_step(peft_model, opt)
        sched.step()
        opt.zero_grad(set_to_none=True)
        run.step, run.tokens = step, run.tokens + tokens
        run.train_curve.append((step, loss))
        run.first_step_at = run.first_step_at or time.perf_counter()
        run.last_step_at = time.perf_counter()
        over = tc.max_trial_time is not None and run.wall_seconds > tc.max_trial_time
        evaluated = step % tc.eval_every == 0 or step == tc.max_steps or over
        if evaluated:
            hooks.evaluate(peft_model, run, ctx)
        if progress:
            progress(step, tc.max_steps, loss)
        if over and step < tc.max_steps:
            run.time_limited = True
            break
        if evaluated and step < tc.max_steps and _patience_spent(run.val_curve, tc):
            run.early_stopped = True
            break


def _patience_spent(val: list[tuple[int, float]], tc) -> bool:
    """Early stopping (as transformers' EarlyStoppingCallback): the last
    ``early_stopping_patience`` evaluations did not beat the best before them by more than
    ``early_stopping_threshold``.

    Example:
        >>> from rankwise.records import TrainSpec
        >>> tc = TrainSpec(early_stopping_patience=2)
        >>> _patience_spent([(10, 3.0), (20, 2.9), (30, 2.95), (40, 2.91)], tc)
        True
        >>> _patience_spent([(10, 3.0), (20, 2.9), (30, 2.95), (40, 2.89)], tc)
        False
    """
    n = tc.early_stopping_patience
    if not n or len(val) <= n:
        return False
    before = min(loss for _, loss in val[:-n])
    recent = min(loss for _, loss in val[-n:])
    return not (math.isfinite(before) and recent < before - tc.early_stopping_threshold)


def _autocast(device: str, dtype: str | None):
    """bf16 autocast of the forward/backward (weights and optimizer state stay fp32)."""
    if not dtype:
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype))


def _token_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over the loss tokens, number of loss tokens)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((target != -100).sum())


def _loss_items(labels: torch.Tensor) -> int:
    """Loss terms in a batch: next-token targets (2-D labels) or one label per example."""
    return int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else labels.numel()


def _loss_fn(spec: TrialSpec):
    """(model, ids, labels) -> (summed loss, loss terms) for the spec's task."""
    if _is_seq_cls(spec):
        from .classify import class_loss

        return class_loss
    return _token_loss


def _train_step(
    model, batches: _Batches, ctx: TrialContext, tc, loss_fn=_token_loss
) -> tuple[float, int]:
    """Forward/backward over ``grad_accum`` micro-batches, weighted by loss tokens.

    Returns (the step's mean loss per loss token, tokens processed)."""
    data = ctx.data
    micro = [batches.next() for _ in range(tc.grad_accum)]
    n_loss = sum(_loss_items(data.train_labels[idx]) for idx in micro)
    total, tokens = 0.0, 0
    for idx in micro:
        x, y = data.train_ids[idx].to(ctx.device), data.train_labels[idx].to(ctx.device)
        with _autocast(ctx.device, tc.autocast):
            loss_sum, _ = loss_fn(model, x, y)
        (loss_sum / max(n_loss, 1)).backward()
        total += float(loss_sum.detach())
        tokens += x.numel()
    return total / max(n_loss, 1), tokens


@torch.no_grad()
def evaluate(
    model,
    ids,
    labels,
    batch_size: int,
    device: str,
    max_batches: int | None = None,
    autocast: str | None = None,
):
    """Token-weighted mean cross-entropy (nats/token) over the validation blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b, start in enumerate(range(0, ids.shape[0], batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        x = ids[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        with _autocast(device, autocast):
            loss, n = _token_loss(model, x, y)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def validation_loss(model, ctx: TrialContext, spec: TrialSpec) -> float:
    """The validation loss a trial reports (the same blocks and batches for every rank)."""
    tc = spec.train
    d = ctx.data
    if _is_seq_cls(spec):
        return validation_scores(model, ctx, spec)["loss"]
    return evaluate(
        model, d.val_ids, d.val_labels, tc.batch_size, ctx.device, tc.eval_batches, tc.autocast
    )


def validation_scores(model, ctx: TrialContext, spec: TrialSpec) -> dict[str, float]:
    """Loss, accuracy and macro-F1 of a classifier on the validation blocks."""
    from .classify import evaluate_classes

    tc, d = spec.train, ctx.data
    return evaluate_classes(
        model,
        d.val_ids,
        d.val_labels,
        tc.batch_size,
        ctx.device,
        tc.eval_batches,
        lambda: _autocast(ctx.device, tc.autocast),
    )


class _Batches:
    """Seeded, epoch-wise shuffled micro-batches of block indices; identical for every rank."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> torch.Tensor:
        while len(self.order) < self.batch_size:
            self.order += torch.randperm(self.n, generator=self.gen).tolist()
        idx, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return torch.tensor(idx)


def _schedule(warmup: int, total: int):
    """HF's linear schedule: linear warm-up to the peak, then linear decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def failure_reason(exc: BaseException, peak: PeakMemory) -> str:
    """The recorded reason of a failed trial: out of memory, unstable, or the error."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return f"{OUT_OF_MEMORY} (peak {peak.poll()} bytes)"
    if isinstance(exc, FloatingPointError):
        return f"unstable: {exc}"
    return f"{type(exc).__name__}: {exc}"


def trial_result(run: Run, **changes) -> TrialResult:
    """The record of a finished run (``changes`` override fields, e.g. for nested ranks)."""
    spec = run.spec
    status, reason = run.status, run.reason
    if status == COMPLETE and run.best is None:
        status, reason = FAILED, "no finite validation loss"
    wall = run.wall_seconds
    fields = dict(
        key=spec.key,
        rank=spec.rank,
        seed=spec.seed,
        status=status,
        reason=reason,
        kind=spec.kind,
        group=spec.group,
        lora_alpha=spec.lora.lora_alpha,
        best_val_loss=run.best[0] if run.best else None,
        best_step=run.best[1] if run.best else None,
        final_train_loss=run.train_curve[-1][1] if run.train_curve else None,
        train_curve=list(run.train_curve),
        val_curve=list(run.val_curve),
        metric=spec.train.metric,
        val_metrics=dict(run.best_scores),
        val_loss_curve=[(s, m["loss"]) for s, m in run.scores]
        if spec.train.metric != "loss"
        else [],
        trainable_params=run.trainable,
        steps=run.step,
        train_tokens=run.tokens,
        wall_seconds=wall,
        setup_seconds=(run.first_step_at - run.started_at) if run.first_step_at else 0.0,
        step_seconds=run.step_seconds,
        tokens_per_second=run.tokens / wall if run.tokens else None,
        peak_memory_bytes=run.peak_bytes,
        time_limited=run.time_limited,
        early_stopped=run.early_stopped,
    )
    return TrialResult(**{**fields, **changes})
