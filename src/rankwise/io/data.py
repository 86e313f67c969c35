"""Reading records, tokenising them at scale, packing, caching.

Records come from a file, a directory of ``.txt`` files, a hub dataset or the built-in
corpus, in one of the formats of :mod:`rankwise.io.formats` (text, prompt/completion,
messages, alpaca, ShareGPT). Preparation streams: records are read one at a time,
checked, and written to an Arrow file in a temporary directory; ``datasets`` tokenises
that file in batches (``Dataset.map(batched=True, num_proc=...)``) into another Arrow
file; the token blocks are then filled batch by batch into one preallocated tensor.
So memory holds the packed blocks and a batch, not every record and token list as
Python objects. Nothing is written to the ``datasets`` cache or the run directory, and
nothing needs the network unless the data is a hub dataset.

Every example ends with EOS and examples are packed into blocks of ``seq_len``
tokens (as TRL's ``packing=True`` and the run_clm ``group_texts`` recipe do), so
no compute is spent on padding. The token blocks are computed once per run and
cached in ``DIR/data/tokens.safetensors``; every trial reuses them.

Example:
    >>> import tempfile
    >>> from rankwise.config import DataConfig
    >>> from rankwise.testing import make_tokenizer
    >>> path = tempfile.mktemp(suffix=".jsonl")
    >>> _ = open(path, "w").write("\\n".join('{"text": "record %d"}' % i for i in range(20)))
    >>> data = prepare_data(DataConfig(train=path, seq_len=16), make_tokenizer(), "unused")
    >>> data.info["format"], data.info["train_records"], tuple(data.train_ids.shape)
    ('text', 18, (11, 16))
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rankwise.config import DataConfig
from rankwise.errors import ConfigError
from rankwise.io.formats import IGNORE, RecordChecker, render_batch
from rankwise.io.readers import _iter_source
from rankwise.storage.rundir import TOKENS_FILE

WRITE_BATCH = 10_000  # records per Arrow record batch: a few MB of JSON text


MAP_BATCH = 1_000  # records per tokenizer call (datasets' default batch size)


PARALLEL_FROM = 20_000  # records; below this, starting worker processes costs more than it saves


def detect_format(records: list[dict], cfg: DataConfig, source: str) -> str:
    """The format of a list of records, checking that every record has its fields."""
    check = RecordChecker(cfg, source)
    for i, record in enumerate(records, 1):
        check(record, f"record {i}")
    return check.format


# -- records to an Arrow file, tokens to packed blocks ----------------------------------------
def _write_arrow(source: str, cfg: DataConfig, flag: str, path: Path) -> tuple[int, str]:
    """Check every record and write it as JSON text to an Arrow stream file.

    One string column keeps records of any shape (Arrow would otherwise unify the
    schemas of nested messages, adding null keys the chat template would see).
    Returns the number of records and their format.
    """
    import pyarrow as pa

    check = RecordChecker(cfg, f"{flag}: {source}")
    schema = pa.schema([("where", pa.string()), ("json", pa.large_string())])
    n, wheres, texts = 0, [], []
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for where, record, text in _iter_source(source, cfg, flag):
            check(record, where)
            wheres.append(where)
            texts.append(text if text is not None else json.dumps(record, default=str))
            n += 1
            if len(texts) == WRITE_BATCH:
                writer.write_batch(pa.record_batch([wheres, texts], schema=schema))
                wheres, texts = [], []
        if texts:
            writer.write_batch(pa.record_batch([wheres, texts], schema=schema))
    if n == 0:
        raise ConfigError(f"{flag}: {source} holds no records")
    return n, check.format


class _Render:
    """``Dataset.map`` batch function: JSON records in, token ids and labels out."""

    def __init__(self, fmt: str, tokenizer, cfg: DataConfig, source: str):
        self.fmt, self.tokenizer, self.cfg, self.source = fmt, tokenizer, cfg, source

    def __call__(self, batch: dict) -> dict:
        records = [json.loads(t) for t in batch["json"]]
        where = [f"{self.source}, {w}" for w in batch["where"]]
        pairs = render_batch(records, self.fmt, self.tokenizer, self.cfg, where)
        return {"input_ids": [p[0] for p in pairs], "labels": [p[1] for p in pairs]}


def _tokenise(ds, render: _Render, out: Path, num_proc: int):
    """Rendered examples (``input_ids``, ``labels`` as int32 lists) in Arrow files at ``out``."""
    from datasets import Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})
    return ds.map(
        render,
        batched=True,
        batch_size=MAP_BATCH,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        features=features,
        cache_file_name=str(out),
        load_from_cache_file=False,
        new_fingerprint=out.stem,  # skips hashing the tokenizer to name a cache entry
    )


def _record_batches(rendered) -> Iterator:
    """The rendered table's record batches, read from its files (not memory-mapped).

    Reading through ``read()`` rather than the memory map keeps the pages out of this
    process's resident set: peak memory stays the packed tensor plus one batch.
    """
    import pyarrow as pa

    files = [f["filename"] for f in rendered.cache_files]
    if not files:  # an in-memory table
        yield from rendered.data.to_batches()
        return
    for name in files:
        with pa.OSFile(name) as src:
            yield from pa.ipc.open_stream(src)


def _pack(rendered, seq_len: int, pad_id: int):
    """Concatenate every example, then cut into ``[N, seq_len]`` blocks (tail padded).

    Returns the ids, the labels and how many labels carry loss (counted per batch: a
    whole-tensor ``(labels != IGNORE).sum()`` would allocate another int64 copy).
    """
    import numpy as np
    import pyarrow.compute as pc
    import torch

    total = pc.sum(pc.list_value_length(rendered.data.column("input_ids"))).as_py() or 0
    n = -(-total // seq_len)
    ids = torch.full((n * seq_len,), pad_id, dtype=torch.long)
    # causal attention: trailing pads never influence real tokens
    labels = torch.full((n * seq_len,), IGNORE, dtype=torch.long)
    ids_np, labels_np, pos, learned = ids.numpy(), labels.numpy(), 0, 0
    for batch in _record_batches(rendered):
        chunk = batch.column("input_ids").flatten().to_numpy()
        ids_np[pos : pos + len(chunk)] = chunk
        chunk = batch.column("labels").flatten().to_numpy()
        labels_np[pos : pos + len(chunk)] = chunk
        learned += int(np.count_nonzero(chunk != IGNORE))
        pos += len(chunk)
    assert pos == total, (pos, total)
    return ids.view(n, seq_len), labels.view(n, seq_len), learned


def _num_proc(cfg: DataConfig, n_records: int) -> int:
    if cfg.num_proc:
        return max(1, min(cfg.num_proc, n_records))
    if n_records < PARALLEL_FROM:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


# -- the whole preparation, cached ----------------------------------------------------------
@dataclass
class TokenData:
    """Packed token blocks ``[N, seq_len]`` and their labels, for training and validation."""

    train_ids: Any
    train_labels: Any
    val_ids: Any
    val_labels: Any
    info: dict


def _fingerprint(cfg: DataConfig, tokenizer, seed: int) -> str:
    options = asdict(cfg)
    options.pop("num_proc")  # how many processes tokenise does not change the tokens
    parts = [
        json.dumps(options, sort_keys=True),
        str(seed),
        str(len(tokenizer)),
        type(tokenizer).__name__,
        tokenizer.name_or_path,
        str(getattr(tokenizer, "chat_template", None)),
    ]
    for src in (cfg.train, cfg.val):
        p = Path(src).expanduser() if src else None
        if p is not None and p.is_file():
            st = p.stat()
            parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _split_order(n: int, cfg: DataConfig, seed: int) -> tuple[list[int], list[int]]:
    """Record indices of the training and validation sets (see :func:`split_records`)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    if cfg.max_examples:
        order = order[: cfg.max_examples]
    if cfg.val:
        return order, []
    n_val = int(len(order) * cfg.val_fraction)
    if n_val == 0:
        raise ConfigError(
            f"--val-fraction {cfg.val_fraction}: the validation set would be empty "
            f"({len(order)} records); give more data, a larger fraction, or --val FILE"
        )
    return order[n_val:], order[:n_val]


def split_records(records: list, cfg: DataConfig, seed: int) -> tuple[list, list]:
    """Seeded, deterministic subsample (``max_examples``) and train/validation split."""
    train, val = _split_order(len(records), cfg, seed)
    return [records[i] for i in train], [records[i] for i in val]


def _load_cache(cache: Path, key: str) -> TokenData | None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if not cache.exists():
        return None
    with safe_open(str(cache), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("fingerprint") != key:
        return None
    t = load_file(str(cache))
    info = json.loads(meta["info"])
    return TokenData(t["train_ids"], t["train_labels"], t["val_ids"], t["val_labels"], info)


def prepare_data(cfg: DataConfig, tokenizer, run_dir: str | Path, seed: int = 0) -> TokenData:
    """Read, split, render and pack — or reuse ``DIR/data/tokens.safetensors``.

    Nothing is written here (bad input must leave the run directory untouched);
    :func:`save_tokens` caches the result once the run is set up. Intermediate Arrow
    files live in a temporary directory, removed on return.
    """
    from datasets.utils import logging as ds_logging

    key = _fingerprint(cfg, tokenizer, seed)
    cached = _load_cache(Path(run_dir) / "data" / TOKENS_FILE, key)
    if cached is not None:
        return cached
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()  # the run has its own progress display
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    blocks, counts = {}, {}
    try:
        with tempfile.TemporaryDirectory(prefix="rankwise-data-") as tmp:
            fmt, rendered = _tokenise_splits(cfg, tokenizer, seed, Path(tmp))
            for name, ds in rendered.items():
                ids, labels, learned = _pack(ds, cfg.seq_len, pad)
                if learned == 0:
                    raise ConfigError(
                        f"--{name}: no tokens to train on after rendering ({len(ds)} "
                        "records; are the completions/assistant turns empty?)"
                    )
                blocks[f"{name}_ids"], blocks[f"{name}_labels"], counts[name] = ids, labels, len(ds)
            del rendered, ds  # unmap the Arrow files before their directory goes
    finally:
        if bars:
            ds_logging.enable_progress_bar()
    info = {
        "format": fmt,
        "train_records": counts["train"],
        "val_records": counts["val"],
        "train_blocks": int(blocks["train_ids"].shape[0]),
        "val_blocks": int(blocks["val_ids"].shape[0]),
        "seq_len": cfg.seq_len,
        "fingerprint": key,
    }
    return TokenData(
        blocks["train_ids"], blocks["train_labels"], blocks["val_ids"], blocks["val_labels"], info
    )


def _tokenise_splits(cfg: DataConfig, tokenizer, seed: int, tmp: Path) -> tuple[str, dict]:
    """The format, and the train and validation examples tokenised into Arrow files.

    The records' own Arrow files are released on return, before packing allocates the
    blocks, so their memory-mapped pages do not add to the peak.
    """
    from datasets import Dataset

    n, fmt = _write_arrow(cfg.train, cfg, "--train", tmp / "train-records.arrow")
    train_idx, val_idx = _split_order(n, cfg, seed)
    records = Dataset.from_file(str(tmp / "train-records.arrow"))
    parts = {"train": (records.select(train_idx), f"--train: {cfg.train}")}
    if cfg.val:
        _write_arrow(cfg.val, replace(cfg, format=fmt), "--val", tmp / "val-records.arrow")
        parts["val"] = (Dataset.from_file(str(tmp / "val-records.arrow")), f"--val: {cfg.val}")
    else:
        parts["val"] = (records.select(val_idx), f"--train: {cfg.train}")
    if fmt in ("messages", "sharegpt") and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--format {fmt}: the tokenizer has no chat template")
    rendered = {}
    for name, (ds, source) in parts.items():
        render = _Render(fmt, tokenizer, cfg, source)
        out = tmp / f"{name}-tokens.arrow"
        rendered[name] = _tokenise(ds, render, out, _num_proc(cfg, len(ds)))
    return fmt, rendered


def save_tokens(data: TokenData, run_dir: str | Path) -> Path:
    """Cache the token blocks in ``DIR/data/`` (atomically) for every trial and for resume."""
    from safetensors.torch import save_file

    cache = Path(run_dir) / "data" / TOKENS_FILE
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tensors = {
        "train_ids": data.train_ids,
        "train_labels": data.train_labels,
        "val_ids": data.val_ids,
        "val_labels": data.val_labels,
    }
    save_file(
        tensors,
        str(tmp),
        metadata={"fingerprint": data.info.get("fingerprint", ""), "info": json.dumps(data.info)},
    )
    tmp.replace(cache)
    return cache
