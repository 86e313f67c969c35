"""What every benchmark shares: its raw results kept as JSON, and tables rendered from them.

A benchmark writes what it measured with :func:`write_results` to
``bench/results/<name>.json`` (one document: the benchmark's name, the environment it ran in,
its settings and its rows), and prints the tables :func:`table` renders from those rows, so
that every table in ``bench/RESULTS.md`` can be rendered again from committed data (PEFT's
``method_comparison/``: results are files, tables are made from them). Tests read the JSON,
not the markdown.

    >>> print(table(["rank", "val loss"], [[1, "3.7548"], [2, "3.6764"]]))
    | rank | val loss |
    |---|---|
    | 1 | 3.7548 |
    | 2 | 3.6764 |
"""

from __future__ import annotations

import datetime
import importlib.metadata as metadata
import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["RESULTS", "environment", "write_results", "read_results", "table", "cpu_name"]

RESULTS = Path(__file__).resolve().parent / "results"
"""Where a full run's results go (committed); a --smoke run writes where it is told."""


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = (line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
            return next(names)
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Where and with what a result was measured (versions read without importing torch)."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "rankwise": _version("rankwise"),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def write_results(
    name: str, rows: Any, folder: Path | None = None, settings: dict | None = None
) -> Path:
    """Write ``folder/<name>.json`` (default ``bench/results/``): the rows, with the settings
    they were measured under and the environment. Returns the path."""
    folder = Path(folder) if folder is not None else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": name, "environment": environment(), "settings": settings or {},
           "results": rows}  # fmt: skip
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


def read_results(name: str, folder: Path | None = None) -> dict[str, Any]:
    """The document :func:`write_results` wrote (``["results"]`` holds the rows)."""
    folder = Path(folder) if folder is not None else RESULTS
    return json.loads((folder / f"{name}.json").read_text())


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: the header, the separator, one line per row (cells as ``str``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
