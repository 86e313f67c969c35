"""Reading records, rendering them to tokens with loss masks, packing, caching.

Formats (``--format``, detected from the fields when ``auto``):
- ``text``: loss on every token;
- ``prompt_completion``: loss on the completion only (prompt labels are -100);
- ``messages``: rendered with the tokenizer's chat template, loss on assistant turns only.

Every example ends with EOS and examples are packed into blocks of ``seq_len``
tokens (as TRL's ``packing=True`` and the run_clm ``group_texts`` recipe do), so
no compute is spent on padding. The token blocks are computed once per run and
cached in ``DIR/data/tokens.safetensors``; every trial reuses them.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import random
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import ConfigError, DataConfig

__all__ = [
    "load_records",
    "detect_format",
    "prepare_data",
    "stdlib_docstrings",
    "TokenData",
    "STDLIB_CORPUS",
    "save_tokens",
    "split_records",
]

STDLIB_CORPUS = "stdlib-docstrings"
IGNORE = -100
TOKENS_FILE = "tokens.safetensors"


# -- reading records ----------------------------------------------------------------------
def load_records(source: str, cfg: DataConfig, flag: str = "--train") -> list[dict[str, Any]]:
    """Records of a file, directory, hub dataset or the built-in corpus."""
    if source == STDLIB_CORPUS:
        return [{"text": t} for t in stdlib_docstrings()]
    path = Path(source).expanduser()
    if path.is_dir():
        if not cfg.txt_per_file:
            raise ConfigError(
                f"{flag}: {source} is a directory; pass --txt-per-file to read one "
                "example per .txt file"
            )
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ConfigError(f"{flag}: {source} holds no .txt files")
        records = [{"text": _read_text(f, flag)} for f in files]
        return _non_empty([r for r in records if r["text"].strip()], source, flag)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".csv", ".parquet", ".txt"):
        if not path.is_file():
            raise ConfigError(f"{flag}: file {source} does not exist")
        reader = {
            ".jsonl": _read_jsonl,
            ".json": _read_json,
            ".csv": _read_csv,
            ".parquet": _read_parquet,
            ".txt": _read_txt,
        }[suffix]
        return _non_empty(reader(path, flag), source, flag)
    if path.exists() or "/" not in source and "." in path.name:
        raise ConfigError(
            f"{flag}: {source}: unsupported file type; expected .jsonl, .json, "
            ".csv, .parquet or .txt"
        )
    return _non_empty(_read_hub(source, cfg.split, flag), source, flag)


def _non_empty(records: list, source: str, flag: str) -> list:
    if not records:
        raise ConfigError(f"{flag}: {source} holds no records")
    return records


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path} ({exc.strerror})") from None


def _read_jsonl(path: Path, flag: str) -> list[dict]:
    records = []
    for lineno, line in enumerate(_read_text(path, flag).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{flag}: {path}, line {lineno}: malformed JSON ({exc.msg})"
            ) from None
        if not isinstance(record, dict):
            raise ConfigError(
                f"{flag}: {path}, line {lineno}: expected a JSON object, got "
                f"{type(record).__name__}"
            )
        records.append(record)
    return records


def _read_json(path: Path, flag: str) -> list[dict]:
    try:
        data = json.loads(_read_text(path, flag))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{flag}: {path}, line {exc.lineno}: malformed JSON ({exc.msg})"
        ) from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} as datasets' `field=` reads it
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConfigError(f"{flag}: {path}: expected a JSON list of objects (or use .jsonl)")
    return data


def _read_csv(path: Path, flag: str) -> list[dict]:
    text = _read_text(path, flag)
    try:
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    except csv.Error as exc:
        raise ConfigError(f"{flag}: {path}: malformed CSV ({exc})") from None


def _read_parquet(path: Path, flag: str) -> list[dict]:
    from datasets import Dataset

    try:
        return Dataset.from_parquet(str(path)).to_list()
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise ConfigError(f"{flag}: {path}: cannot read Parquet ({type(exc).__name__})") from None


def _read_txt(path: Path, flag: str) -> list[dict]:
    return [{"text": line} for line in _read_text(path, flag).splitlines() if line.strip()]


def _read_hub(name: str, split: str, flag: str) -> list[dict]:
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except Exception as exc:
        raise ConfigError(
            f"{flag}: {name!r} is not a local file and could not be loaded as a hub "
            f"dataset ({type(exc).__name__}); offline, pass a file"
        ) from None


def stdlib_docstrings(min_chars: int = 40) -> list[str]:
    """Docstrings of the Python standard library, in a deterministic order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "ensurepip", "turtledemo"}
    texts = []
    for file in sorted(root.rglob("*.py")):
        if skip & set(file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    texts.append(doc)
    return texts


# -- formats and rendering ----------------------------------------------------------------
def detect_format(records: list[dict], cfg: DataConfig, source: str) -> str:
    """The record format, checking that the fields it needs are there."""
    fields = list(records[0].keys())
    need = {
        "text": [cfg.text_field],
        "messages": [cfg.messages_field],
        "prompt_completion": [cfg.prompt_field, cfg.completion_field],
    }
    fmt = cfg.format
    if fmt == "auto":
        fmt = next(
            (
                f
                for f in ("messages", "prompt_completion", "text")
                if all(k in records[0] for k in need[f])
            ),
            None,
        )
        if fmt is None:
            raise ConfigError(
                f"{source}: records have fields {', '.join(fields)}; expected "
                f"{cfg.text_field!r}, {cfg.prompt_field!r}+{cfg.completion_field!r} or "
                f"{cfg.messages_field!r} (rename with --text-field etc.)"
            )
    for i, record in enumerate(records):
        missing = [k for k in need[fmt] if k not in record]
        if missing:
            raise ConfigError(
                f"{source}: record {i + 1} has no field {', '.join(missing)} "
                f"(fields found: {', '.join(record.keys())})"
            )
    return fmt


def _render(record: dict, fmt: str, tokenizer, cfg: DataConfig) -> tuple[list[int], list[int]]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        ids = tokenizer(str(record[cfg.text_field]))["input_ids"] + eos
        return ids, list(ids)
    if fmt == "prompt_completion":
        prompt = tokenizer(str(record[cfg.prompt_field]))["input_ids"]
        completion = tokenizer(str(record[cfg.completion_field]), add_special_tokens=False)
        completion = completion["input_ids"] + eos
        return prompt + completion, [IGNORE] * len(prompt) + completion
    return _render_chat(record[cfg.messages_field], tokenizer)


def _render_chat(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Chat template rendering; labels only on the characters of assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("--format messages: the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") == "assistant":
            start = (
                len(
                    tokenizer.apply_chat_template(
                        messages[:i], tokenize=False, add_generation_prompt=True
                    )
                )
                if i
                else 0
            )
            end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
            spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels


def _pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    import torch

    ids = [t for ex in examples for t in ex[0]]
    labels = [t for ex in examples for t in ex[1]]
    n = -(-len(ids) // seq_len)
    pad = n * seq_len - len(ids)
    ids += [pad_id] * pad
    labels += [IGNORE] * pad  # causal attention: trailing pads never influence real tokens
    return (
        torch.tensor(ids, dtype=torch.long).view(n, seq_len),
        torch.tensor(labels, dtype=torch.long).view(n, seq_len),
    )


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
    parts = [
        json.dumps(asdict(cfg), sort_keys=True),
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


def split_records(records: list, cfg: DataConfig, seed: int) -> tuple[list, list]:
    """Seeded, deterministic subsample (``max_examples``) and train/validation split."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if cfg.max_examples:
        order = order[: cfg.max_examples]
    if cfg.val:
        return [records[i] for i in order], []
    n_val = int(len(order) * cfg.val_fraction)
    if n_val == 0:
        raise ConfigError(
            f"--val-fraction {cfg.val_fraction}: the validation set would be empty "
            f"({len(order)} records); give more data, a larger fraction, or --val FILE"
        )
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def prepare_data(cfg: DataConfig, tokenizer, run_dir: str | Path, seed: int = 0) -> TokenData:
    """Read, split, render and pack — or reuse ``DIR/data/tokens.safetensors``.

    Nothing is written here (bad input must leave the run directory untouched);
    :func:`save_tokens` caches the result once the run is set up.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    cache = Path(run_dir) / "data" / TOKENS_FILE
    key = _fingerprint(cfg, tokenizer, seed)
    if cache.exists():
        with safe_open(str(cache), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") == key:
            t = load_file(str(cache))
            return TokenData(
                t["train_ids"],
                t["train_labels"],
                t["val_ids"],
                t["val_labels"],
                json.loads(meta["info"]),
            )
    records = load_records(cfg.train, cfg, "--train")
    fmt = detect_format(records, cfg, cfg.train)
    train, val = split_records(records, cfg, seed)
    if cfg.val:
        val = load_records(cfg.val, cfg, "--val")
        detect_format(val, DataConfig(**{**asdict(cfg), "format": fmt}), cfg.val)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    blocks = {}
    for name, recs in (("train", train), ("val", val)):
        rendered = [_render(r, fmt, tokenizer, cfg) for r in recs]
        ids, labels = _pack(rendered, cfg.seq_len, pad)
        if int((labels != IGNORE).sum()) == 0:
            raise ConfigError(
                f"--{name}: no tokens to train on after rendering ({len(recs)} "
                "records; are the completions/assistant turns empty?)"
            )
        blocks[f"{name}_ids"], blocks[f"{name}_labels"] = ids, labels
    info = {
        "format": fmt,
        "train_records": len(train),
        "val_records": len(val),
        "train_blocks": int(blocks["train_ids"].shape[0]),
        "val_blocks": int(blocks["val_ids"].shape[0]),
        "seq_len": cfg.seq_len,
        "fingerprint": key,
    }
    return TokenData(
        blocks["train_ids"], blocks["train_labels"], blocks["val_ids"], blocks["val_labels"], info
    )


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
