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


# Per-block validation losses kept with a trial, at most: blocks beyond it are averaged in
# consecutive groups. 256 pairs estimate the standard error of a paired difference to ~5%.
MAX_BLOCKS = 256


def _token_loss(
    model, ids: torch.Tensor, labels: torch.Tensor, blocks: list | None = None
) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over the loss tokens, number of loss tokens);
    with ``blocks``, each block's mean loss is appended to it (blocks with a loss token)."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        target.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).reshape(target.shape)
    if blocks is not None:
        counts = (target != -100).sum(dim=1)
        sums = losses.sum(dim=1)
        blocks += [float(s / c) for s, c in zip(sums, counts, strict=True) if c > 0]
    return losses.sum(), int((target != -100).sum())


def grouped(blocks: list[float], most: int = MAX_BLOCKS) -> list[float]:
    """``blocks`` averaged in consecutive groups so that at most ``most`` remain.

    >>> grouped([1.0, 2.0, 3.0, 4.0, 5.0], most=2)
    [1.5, 4.0]
    """
    if len(blocks) <= most:
        return list(blocks)
    edges = [round(i * len(blocks) / most) for i in range(most + 1)]
    return [sum(blocks[a:b]) / (b - a) for a, b in zip(edges, edges[1:], strict=False)]


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
    blocks: list | None = None,
):
    """Token-weighted mean cross-entropy (nats/token) over the validation blocks (and each
    block's own mean appended to ``blocks``, when given)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b, start in enumerate(range(0, ids.shape[0], batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        x = ids[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        with _autocast(device, autocast):
            loss, n = _token_loss(model, x, y, blocks)
        total += float(loss)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def validation_loss(model, ctx: TrialContext, spec: TrialSpec, blocks: list | None = None):
    """The validation loss a trial reports (the same blocks and batches for every rank)."""
    tc = spec.train
    d = ctx.data
    if _is_seq_cls(spec):
        return validation_scores(model, ctx, spec)["loss"]
    return evaluate(
        model, d.val_ids, d.val_labels, tc.batch_size, ctx.device, tc.eval_batches, tc.autocast,
        blocks,
    )  # fmt: skip


def measure(
    model, ctx: TrialContext, spec: TrialSpec, blocks: list | None = None
) -> tuple[float, dict | None]:
    """(objective, scores) of one evaluation: the validation loss and no scores, or for a
    classifier ``1 - metric`` (or the loss) and every metric measured. A language model's
    per-block losses go to ``blocks`` (the paired noise of a comparison between ranks)."""
    if not _is_seq_cls(spec):
        return validation_loss(model, ctx, spec, blocks), None
    from rankwise.core.metrics import objective

    scores = validation_scores(model, ctx, spec)
    return objective(scores, spec.train.metric), scores


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
