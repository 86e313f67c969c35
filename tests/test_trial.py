"""One trial: fairness, the base model left untouched, PEFT's scaling, failures as records."""

from __future__ import annotations

import pytest
import torch

from rankwise.records import TrialSpec
from rankwise.training.adapter import attach_adapter
from rankwise.training.trial import run_trial

from .test_lifecycle import digest  # values, grads, requires_grad and train/eval modes


@pytest.fixture
def ctx(tiny_ctx):
    return tiny_ctx


def spec(rank, **lora):
    kw = {
        "r": rank,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        **lora,
    }
    train = {
        "max_steps": 4,
        "batch_size": 4,
        "grad_accum": 2,
        "lr": 1e-2,
        "warmup_steps": 1,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "eval_every": 2,
        "eval_batches": None,
        "seed": 0,
        "max_trial_time": None,
    }
    return TrialSpec(key=f"r{rank}", rank=rank, seed=0, lora=kw, train=train, model={}, data_dir="")


def test_trial_records_curves_and_counts(ctx):
    r = run_trial(spec(4), ctx)
    assert r.status == "complete", r.reason
    assert [s for s, _ in r.train_curve] == [1, 2, 3, 4]
    assert [s for s, _ in r.val_curve] == [2, 4]
    assert r.best_val_loss == min(v for _, v in r.val_curve)
    # PEFT's count: r * (in + out) for q_proj and v_proj (64 -> 64) in 2 layers
    assert r.trainable_params == 4 * (64 + 64) * 2 * 2
    assert r.train_tokens == 4 * 4 * 2 * 16 and r.tokens_per_second > 0
    assert r.peak_memory_bytes > 0 and r.wall_seconds > 0


def test_base_weights_bit_identical_after_trials(ctx):
    before = digest(ctx.model)
    for rank in (1, 8):
        run_trial(spec(rank), ctx)
    assert digest(ctx.model) == before
    assert not any(p.requires_grad for p in ctx.model.parameters())
    assert not any("lora" in n for n, _ in ctx.model.named_modules())


def test_every_rank_sees_the_same_batches(ctx, monkeypatch):
    from rankwise.training import lifecycle as trial

    seen: dict[int, list] = {}
    original = trial._Batches.next

    def record(self):
        idx = original(self)
        seen.setdefault(current, []).append(idx.tolist())
        return idx

    monkeypatch.setattr(trial._Batches, "next", record)
    for current in (1, 16):
        run_trial(spec(current), ctx)
    assert seen[1] == seen[16] and len(seen[1]) == 8


@pytest.mark.parametrize(
    "lora,rank,expected",
    [
        ({}, 8, 16 / 8),
        ({"use_rslora": True}, 16, 16 / 4),
        ({"lora_alpha": 32}, 16, 32 / 16),
    ],
)
def test_alpha_policies_give_the_scaling_peft_applies(ctx, lora, rank, expected):
    from peft.tuners.lora import LoraLayer

    peft_model = attach_adapter(ctx.model, spec(rank, **lora))
    try:
        scalings = {m.scaling["default"] for m in peft_model.modules() if isinstance(m, LoraLayer)}
        assert scalings and all(s == pytest.approx(expected) for s in scalings)
    finally:
        peft_model.unload()


def test_out_of_memory_is_a_record_and_base_survives(ctx, monkeypatch):
    from rankwise.training import lifecycle as trial

    before = digest(ctx.model)

    def boom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trial, "_train_step", boom)
    r = run_trial(spec(8), ctx)
    assert r.status == "failed" and r.out_of_memory and r.reason.startswith("out of memory")
    assert digest(ctx.model) == before
    monkeypatch.undo()
    assert run_trial(spec(2), ctx).status == "complete"


def test_non_finite_loss_is_unstable(ctx, monkeypatch):
    from rankwise.training import lifecycle as trial

    real = trial._train_step
    calls = []

    def diverge(*a, **k):
        loss, tokens = real(*a, **k)
        calls.append(loss)
        return (float("nan") if len(calls) == 3 else loss), tokens

    monkeypatch.setattr(trial, "_train_step", diverge)
    before = digest(ctx.model)
    r = run_trial(spec(4), ctx)
    assert r.status == "failed" and r.reason == "unstable: non-finite training loss at step 3"
    assert r.best_val_loss is not None and r.best_step == 2  # what it reached is kept
    assert digest(ctx.model) == before


def test_max_trial_time_stops_and_scores_what_was_reached(ctx):
    s = spec(4)
    s = s.replace(train=s.train.replace(max_steps=1000, max_trial_time=0.5))
    r = run_trial(s, ctx)
    assert r.status == "complete" and r.time_limited and r.steps < 1000
    assert r.val_curve[-1][0] == r.steps and r.best_val_loss is not None


def test_a_trial_early_stops_at_the_first_spent_patience(ctx):
    """A rate that overfits the random blocks: the val loss stops improving, and the trial
    ends at the first evaluation whose last `patience` points did not beat the best before."""
    from rankwise.training.lifecycle import _patience_spent

    s = spec(4)
    s = s.replace(
        train=s.train.replace(max_steps=40, lr=3e-2, grad_accum=1, early_stopping_patience=2)
    )
    r = run_trial(s, ctx)
    assert r.ok and r.early_stopped and r.steps < 40
    assert r.val_curve[-1][0] == r.steps
    spent = [_patience_spent(r.val_curve[:n], s.train) for n in range(1, len(r.val_curve) + 1)]
    assert spent[-1] and not any(spent[:-1])
    assert r.best_val_loss == min(v for _, v in r.val_curve)
