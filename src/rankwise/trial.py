"""One trial: attach a fresh LoRA adapter of one rank, train, evaluate, remove it.

``run_trial(spec) -> TrialResult`` is a function of a serialisable
:class:`~rankwise.records.TrialSpec`; the loaded model and token blocks are a
per-process cache (:class:`TrialContext`), so the same call works in-process (the
search passes its context) or on a remote worker (which loads them from the spec).

Fairness: every rank sees the same token blocks in the same order (a generator
seeded with ``spec.seed``), the same schedule, steps and evaluation points, and the
adapter is initialised after ``torch.manual_seed(spec.seed)``. The base weights are
never touched: PEFT's ``unload()`` removes the LoRA layers after every trial.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .records import COMPLETE, FAILED, OUT_OF_MEMORY, TrialResult, TrialSpec
from .resources import PeakMemory

__all__ = [
    "TrialContext",
    "run_trial",
    "evaluate",
    "attach_adapter",
    "lora_config",
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
        from safetensors.torch import load_file

        from .config import ModelConfig
        from .data import TokenData
        from .models import load_model

        key = (repr(sorted(spec.model.items())), spec.data_dir)
        cache = _PROCESS_CACHE.get(key)
        if cache is None:
            model, tokenizer, device = load_model(ModelConfig(**spec.model))
            t = load_file(f"{spec.data_dir}/tokens.safetensors")
            data = TokenData(t["train_ids"], t["train_labels"], t["val_ids"], t["val_labels"], {})
            cache = _PROCESS_CACHE[key] = cls(model, tokenizer, device, data)
            gc.freeze()  # the model's objects are permanent: keep them out of every collection
        return cache


_PROCESS_CACHE: dict = {}


def lora_config(spec_lora: dict):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **spec_lora)


def attach_adapter(model, spec: TrialSpec):
    """A fresh PEFT adapter on ``model`` (seeded init); returns the PeftModel."""
    from peft import get_peft_model

    torch.manual_seed(spec.seed)
    return get_peft_model(model, lora_config(spec.lora))


@torch.no_grad()
def evaluate(model, ids, labels, batch_size: int, device: str, max_batches: int | None = None):
    """Token-weighted mean cross-entropy (nats/token) over the validation blocks."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b, start in enumerate(range(0, ids.shape[0], batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        x = ids[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        target = y[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(loss)
        count += int((target != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


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


def _train_step(model, batches, data, device, grad_accum) -> tuple[float, int]:
    """Forward/backward over ``grad_accum`` micro-batches; returns (mean loss, tokens)."""
    losses, tokens = [], 0
    for _ in range(grad_accum):
        idx = batches.next()
        x, y = data.train_ids[idx].to(device), data.train_labels[idx].to(device)
        loss = model(input_ids=x, labels=y).loss
        (loss / grad_accum).backward()
        losses.append(float(loss.detach()))
        tokens += x.numel()
    return sum(losses) / len(losses), tokens


class _Run:
    """Mutable state of one training run (kept out of run_trial to keep it short)."""

    def __init__(self, spec: TrialSpec):
        self.spec = spec
        self.train_curve: list[tuple[int, float]] = []
        self.val_curve: list[tuple[int, float]] = []
        self.best: tuple[float, int] | None = None
        self.best_state: dict | None = None
        self.tokens = 0
        self.step = 0
        self.time_limited = False
        self.first_step_at: float | None = None
        self.last_step_at: float | None = None

    def record_eval(self, peft_model, loss: float) -> None:
        self.val_curve.append((self.step, loss))
        if math.isfinite(loss) and (self.best is None or loss < self.best[0]):
            self.best = (loss, self.step)
            # The adapter delivered is the best checkpoint, so it reproduces the score.
            self.best_state = {
                k: v.detach().clone() for k, v in peft_model.named_parameters() if v.requires_grad
            }


def _fit(peft_model, run: _Run, ctx: TrialContext, t0: float, progress: Progress | None):
    tc = run.spec.train
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(tc["warmup_steps"], tc["max_steps"]))
    batches = _Batches(ctx.data.train_ids.shape[0], tc["batch_size"], run.spec.seed)
    limit = tc.get("max_trial_time")
    peft_model.train()
    for step in range(1, tc["max_steps"] + 1):
        loss, tokens = _train_step(peft_model, batches, ctx.data, ctx.device, tc["grad_accum"])
        if not math.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {step}")
        torch.nn.utils.clip_grad_norm_(params, tc["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        run.step, run.tokens = step, run.tokens + tokens
        run.train_curve.append((step, loss))
        run.first_step_at = run.first_step_at or time.perf_counter()
        run.last_step_at = time.perf_counter()
        over = limit is not None and time.perf_counter() - t0 > limit
        if step % tc["eval_every"] == 0 or step == tc["max_steps"] or over:
            run.record_eval(peft_model, _eval(peft_model, ctx, tc))
        if progress:
            progress(step, tc["max_steps"], loss)
        if over and step < tc["max_steps"]:
            run.time_limited = True
            break


def _eval(model, ctx: TrialContext, tc: dict) -> float:
    return evaluate(
        model,
        ctx.data.val_ids,
        ctx.data.val_labels,
        tc["batch_size"],
        ctx.device,
        tc.get("eval_batches"),
    )


def run_trial(
    spec: TrialSpec, ctx: TrialContext | None = None, progress: Progress | None = None
) -> TrialResult:
    """Train and evaluate one adapter. Failures (OOM, NaN, errors) become a failed result."""
    ctx = ctx or TrialContext.for_spec(spec)
    t0 = time.perf_counter()
    run = _Run(spec)
    peak = PeakMemory(ctx.device)
    status, reason, trainable = COMPLETE, "", None
    peft_model = None
    try:
        with peak:
            peft_model = attach_adapter(ctx.model, spec)
            trainable = peft_model.get_nb_trainable_parameters()[0]
            _fit(peft_model, run, ctx, t0, progress)
            if spec.adapter_dir and run.best_state is not None:
                _save_best(peft_model, run, spec.adapter_dir)
    except Exception as exc:  # a failed trial is a record, not the end of the search
        status, reason = FAILED, failure_reason(exc, peak)
    finally:
        if peft_model is not None:
            peft_model.unload()
        run.best_state = None
        if status != COMPLETE or ctx.device.startswith("cuda"):
            # A full collection costs ~0.5 s with a model loaded; refcounting frees a normal
            # trial's tensors, so collect only where memory must come back now.
            gc.collect()
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return _result(spec, run, status, reason, trainable, peak.bytes, t0)


def failure_reason(exc: BaseException, peak: PeakMemory) -> str:
    """The recorded reason of a failed trial: out of memory, unstable, or the error."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return f"{OUT_OF_MEMORY} (peak {peak.poll()} bytes)"
    if isinstance(exc, FloatingPointError):
        return f"unstable: {exc}"
    return f"{type(exc).__name__}: {exc}"


def _save_best(peft_model, run: _Run, adapter_dir: str) -> None:
    with torch.no_grad():
        named = dict(peft_model.named_parameters())
        for k, v in run.best_state.items():
            named[k].copy_(v)
    peft_model.save_pretrained(adapter_dir)


def _result(spec, run: _Run, status, reason, trainable, peak_bytes, t0) -> TrialResult:
    wall = time.perf_counter() - t0
    train_span = (run.last_step_at - run.first_step_at) if run.first_step_at else None
    steps_timed = run.step - 1 if run.step > 1 else 0
    step_seconds = train_span / steps_timed if train_span and steps_timed else None
    if status == COMPLETE and run.best is None:
        status, reason = FAILED, "no finite validation loss"
    return TrialResult(
        key=spec.key,
        rank=spec.rank,
        seed=spec.seed,
        status=status,
        reason=reason,
        group=spec.group,
        lora_alpha=spec.lora.get("lora_alpha"),
        best_val_loss=run.best[0] if run.best else None,
        best_step=run.best[1] if run.best else None,
        final_train_loss=run.train_curve[-1][1] if run.train_curve else None,
        train_curve=run.train_curve,
        val_curve=run.val_curve,
        trainable_params=trainable,
        steps=run.step,
        train_tokens=run.tokens,
        wall_seconds=wall,
        setup_seconds=(run.first_step_at - t0) if run.first_step_at else 0.0,
        step_seconds=step_seconds,
        tokens_per_second=run.tokens / wall if run.tokens else None,
        peak_memory_bytes=int(peak_bytes) if peak_bytes else None,
        time_limited=run.time_limited,
    )
