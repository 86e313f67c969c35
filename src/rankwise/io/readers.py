"""Reading the user's records: JSONL, JSON, CSV, Parquet, text files, a hub dataset, or the
stdlib's docstrings; a bad line or file is refused naming it.
"""

from __future__ import annotations

import ast
import csv
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rankwise.config import DataConfig
from rankwise.errors import ConfigError

READ_BATCH = 10_000  # records per batch read from Parquet or a hub dataset

STDLIB_CORPUS = "stdlib-docstrings"


# -- reading records ----------------------------------------------------------------------
def load_records(source: str, cfg: DataConfig, flag: str = "--train") -> list[dict[str, Any]]:
    """Records of a file, directory, hub dataset or the built-in corpus, as a list."""
    records = [record for _, record, _ in _iter_source(source, cfg, flag)]
    if not records:
        raise ConfigError(f"{flag}: {source} holds no records")
    return records


def _iter_source(source: str, cfg: DataConfig, flag: str) -> Iterator[tuple[str, Any, str | None]]:
    """``(where, record, its JSON text or None)`` for each record, streamed where possible.

    ``where`` is ``"line N"`` (JSON Lines, .txt: physical lines, from 1) or ``"record N"``.
    """
    if source == STDLIB_CORPUS:
        return _numbered({"text": t} for t in stdlib_docstrings())
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
        texts = (_read_text(f, flag) for f in files)
        return _numbered({"text": t} for t in texts if t.strip())
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
        return reader(path, flag)
    if path.exists() or "/" not in source and "." in path.name:
        raise ConfigError(
            f"{flag}: {source}: unsupported file type; expected .jsonl, .json, "
            ".csv, .parquet or .txt"
        )
    return _read_hub(source, cfg.split, flag)


def _numbered(records) -> Iterator[tuple[str, Any, None]]:
    for i, record in enumerate(records, 1):
        yield f"record {i}", record, None


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path} ({exc.strerror})") from None


def _parse_json(path: Path, flag: str) -> Any:
    try:
        return json.loads(_read_text(path, flag))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{flag}: {path}, line {exc.lineno}: malformed JSON ({exc.msg})"
        ) from None


def read_json_object(path: Path, flag: str) -> dict:
    """A JSON file that holds one object; anything else is a one-line ConfigError naming
    ``flag`` and the file."""
    data = _parse_json(path, flag)
    if not isinstance(data, dict):
        raise ConfigError(f"{flag}: {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _lines(path: Path, flag: str) -> Iterator[str]:
    """The file's ``str.splitlines()``, read a line at a time."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f:  # universal newlines split at \n, \r\n and \r ...
                yield from line.splitlines()  # ... and splitlines at the rest (\f, \x1c, ...)
    except UnicodeDecodeError:
        raise ConfigError(f"{flag}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path} ({exc.strerror})") from None


def _read_jsonl(path: Path, flag: str) -> Iterator[tuple[str, Any, str]]:
    for lineno, line in enumerate(_lines(path, flag), 1):
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
        yield f"line {lineno}", record, line


def _read_json(path: Path, flag: str) -> Iterator[tuple[str, Any, None]]:
    data = _parse_json(path, flag)
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"data": [...]} as datasets' `field=` reads it
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ConfigError(f"{flag}: {path}: expected a JSON list of objects (or use .jsonl)")
    return _numbered(data)


def _read_csv(path: Path, flag: str) -> Iterator[tuple[str, Any, None]]:
    try:
        yield from _numbered(dict(row) for row in csv.DictReader(_lines(path, flag)))
    except csv.Error as exc:
        raise ConfigError(f"{flag}: {path}: malformed CSV ({exc})") from None


def _read_parquet(path: Path, flag: str) -> Iterator[tuple[str, Any, None]]:
    import pyarrow.parquet as pq

    def rows():
        for batch in pq.ParquetFile(str(path)).iter_batches(batch_size=READ_BATCH):
            yield from batch.to_pylist()

    try:
        yield from _numbered(rows())
    except ConfigError:
        raise
    except Exception as exc:  # pyarrow raises many types for a bad file
        raise ConfigError(f"{flag}: {path}: cannot read Parquet ({type(exc).__name__})") from None


def _read_txt(path: Path, flag: str) -> Iterator[tuple[str, Any, None]]:
    for lineno, line in enumerate(_lines(path, flag), 1):
        if line.strip():
            yield f"line {lineno}", {"text": line}, None


def _read_hub(name: str, split: str, flag: str) -> Iterator[tuple[str, Any, None]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise ConfigError(
            f"{flag}: {name!r} is not a local file and could not be loaded as a hub "
            f"dataset ({type(exc).__name__}); offline, pass a file"
        ) from None

    def rows():
        for batch in ds.iter(batch_size=READ_BATCH):  # a dict of columns
            for values in zip(*batch.values(), strict=True):
                yield dict(zip(batch, values, strict=True))

    return _numbered(rows())


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
