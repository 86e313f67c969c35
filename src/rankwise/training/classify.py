"""Sequence classification (``--task seq-cls``): labelled records in, padded blocks out.

Records are read with :func:`rankwise.io.data.load_records` (the same files and hub
datasets as causal-LM data); each holds a text (``--text-field``) and a class label
(``--label-field``), a string or an integer. The label set is read from ``--train`` (all
of it, before the validation split, so a held-out share cannot hold a label the model
has no output for) and sorted; a ``--val`` record whose label is outside it is refused.
The label set fixes the head (``num_labels``) and is stored with the run's data facts.

Every example is one block: its tokens, truncated to ``--seq-len`` and padded to it.
Pad positions hold ``-100`` in the id tensor (not the pad id), so the attention mask is
exact even where the pad token also occurs in text (a causal LM's pad is often its EOS);
:func:`class_logits` puts the model's pad id back before the forward. The label tensor
holds one class index per block.

Example:
    >>> from rankwise.config import DataConfig
    >>> rows = [{"text": "a", "label": "b"}, {"text": "c", "label": "a"}, {"text": "d"}]
    >>> label_set(rows[:2], DataConfig(), "train.jsonl")
    ['a', 'b']
    >>> label_set(rows, DataConfig(), "train.jsonl")
    Traceback (most recent call last):
    ...
    rankwise.errors.ConfigError: --label-field label: train.jsonl, record 3 has no field 'label' (fields found: text)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from rankwise.config import DataConfig
from rankwise.errors import ConfigError
from rankwise.io.data import split_records
from rankwise.io.readers import load_records

__all__ = [
    "Labelled",
    "label_set",
    "read_labelled",
    "encode",
    "class_logits",
    "class_loss",
    "evaluate_classes",
]

IGNORE = -100


@dataclass(frozen=True)
class Labelled:
    """Texts and class indices for training and validation, and the label set."""

    labels: list
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]


def _key(value: Any) -> str:
    return str(value)  # 1 (JSON) and "1" (CSV) are the same label to a user


def _label(record: dict, i: int, cfg: DataConfig, source: str):
    where = f"--label-field {cfg.label_field}: {source}, record {i + 1}"
    if cfg.label_field not in record:
        raise ConfigError(
            f"{where} has no field {cfg.label_field!r} (fields found: {', '.join(record)})"
        )
    value = record[cfg.label_field]
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ConfigError(f"{where}: expected a string or integer label, got {value!r}")
    return value


def _text(record: dict, i: int, cfg: DataConfig, source: str) -> str:
    if cfg.text_field not in record:
        raise ConfigError(
            f"--text-field {cfg.text_field}: {source}, record {i + 1} has no field "
            f"{cfg.text_field!r} (fields found: {', '.join(record)})"
        )
    return str(record[cfg.text_field])


def label_set(records: list[dict], cfg: DataConfig, source: str) -> list:
    """The sorted labels of ``records`` (integers numerically, otherwise as text)."""
    seen: dict[str, Any] = {}
    for i, record in enumerate(records):
        value = _label(record, i, cfg, source)
        seen.setdefault(_key(value), value)
    values = list(seen.values())
    if all(isinstance(v, int) for v in values):
        return sorted(values)
    return sorted(values, key=_key)


def read_labelled(cfg: DataConfig, seed: int = 0) -> Labelled:
    """Read, check and split labelled records (before any model is loaded)."""
    records = load_records(cfg.train, cfg, "--train")
    labels = label_set(records, cfg, cfg.train)
    if len(labels) < 2:
        raise ConfigError(
            f"--label-field {cfg.label_field}: {cfg.train} holds one label ({labels[0]!r}); "
            "classification needs two or more"
        )
    index = {_key(v): i for i, v in enumerate(labels)}
    pairs = [
        (_text(r, i, cfg, cfg.train), index[_key(r[cfg.label_field])])
        for i, r in enumerate(records)
    ]
    train, val = split_records(pairs, cfg, seed)
    if cfg.val:
        val = []
        for i, r in enumerate(load_records(cfg.val, cfg, "--val")):
            value = _label(r, i, cfg, cfg.val)
            if _key(value) not in index:
                raise ConfigError(
                    f"--val: {cfg.val}, record {i + 1}: label {value!r} is not among the "
                    f"labels of --train ({', '.join(map(str, labels))})"
                )
            val.append((_text(r, i, cfg, cfg.val), index[_key(value)]))
    return Labelled(labels, train, val)


def encode(labelled: Labelled, tokenizer, seq_len: int):
    """Token blocks ``[N, seq_len]`` (pads as -100) and class indices ``[N]`` per split."""
    import torch

    from rankwise.io.data import TokenData

    tensors, truncated = {}, 0
    for name, pairs in (("train", labelled.train), ("val", labelled.val)):
        ids = torch.full((len(pairs), seq_len), IGNORE, dtype=torch.long)
        for row, (text, _) in enumerate(pairs):
            tokens = tokenizer(text, add_special_tokens=True)["input_ids"]
            truncated += len(tokens) > seq_len
            tokens = tokens[:seq_len] or [tokenizer.pad_token_id]  # an empty text: one pad
            ids[row, : len(tokens)] = torch.tensor(tokens)
        tensors[f"{name}_ids"] = ids
        tensors[f"{name}_labels"] = torch.tensor([c for _, c in pairs], dtype=torch.long)
    counts = Counter(labelled.labels[c] for _, c in labelled.train)
    info = {
        "task": "seq-cls",
        "format": f"seq-cls, {len(labelled.labels)} labels",
        "labels": labelled.labels,
        "train_label_counts": {_key(v): counts[v] for v in labelled.labels},
        "train_records": len(labelled.train),
        "val_records": len(labelled.val),
        "train_blocks": len(labelled.train),
        "val_blocks": len(labelled.val),
        "seq_len": seq_len,
        "truncated": truncated,
    }
    return TokenData(
        tensors["train_ids"],
        tensors["train_labels"],
        tensors["val_ids"],
        tensors["val_labels"],
        info,
    )


# -- the forward pass ------------------------------------------------------------------------
def class_logits(model, ids):
    """Logits ``[B, num_labels]`` of blocks whose pad positions hold -100."""
    mask = ids != IGNORE
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return model(input_ids=ids.masked_fill(~mask, pad), attention_mask=mask.long()).logits


def class_loss(model, ids, labels):
    """(sum of the examples' cross-entropies, number of examples)."""
    import torch

    logits = class_logits(model, ids).float()
    loss = torch.nn.functional.cross_entropy(logits, labels, reduction="sum")
    return loss, labels.numel()


def evaluate_classes(
    model, ids, labels, batch_size: int, device: str, max_batches=None, autocast=None
):
    """Mean cross-entropy per example, accuracy and macro-F1 over the validation blocks.

    ``autocast`` is a zero-argument callable returning the context each forward runs in.
    """
    import torch

    from rankwise.core.metrics import accuracy, macro_f1

    was_training = model.training
    model.eval()
    total, preds, trues = 0.0, [], []
    with torch.no_grad():
        for b, start in enumerate(range(0, ids.shape[0], batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            x = ids[start : start + batch_size].to(device)
            y = labels[start : start + batch_size].to(device)
            with autocast() if autocast else torch.autocast("cpu", enabled=False):
                logits = class_logits(model, x).float()
            total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            preds.append(logits.argmax(-1).cpu())
            trues.append(y.cpu())
    model.train(was_training)
    pred, true = torch.cat(preds), torch.cat(trues)
    return {
        "loss": total / max(true.numel(), 1),
        "accuracy": accuracy(pred, true),
        "f1": macro_f1(pred, true),
    }
