"""Evaluation: the validation loss (and a classifier's metrics) of a model on the token blocks."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from rankwise.records import TrialSpec
from rankwise.training.adapter import TrialContext, _is_seq_cls


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
    from rankwise.training.classify import evaluate_classes

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
