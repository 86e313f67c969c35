"""Persistence of a run: one SQLite file, one row per trial.

A trial's row is written ``running`` when it starts and replaced by its result in
one transaction when it ends, so a crash (Ctrl-C, kill -9, power loss) leaves at
worst a ``running`` row, which the next run discards and redoes. A finished row's
result is never rewritten; only an annotation may change (:meth:`RunStore.annotate`:
whether a trial run ahead by a parallel search turned out to be needed). WAL mode lets ``rankwise show``/``report`` read while a search
writes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from rankwise.errors import ConfigError
from rankwise.records import TrialResult, TrialSpec

__all__ = ["RunStore", "STORE_FILE", "identity_diff", "raise_if_different"]

STORE_FILE = "trials.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    rank INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    grp TEXT NOT NULL DEFAULT '',
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    best_val_loss REAL,
    spec TEXT NOT NULL,
    result TEXT
);
"""


class RunStore:
    """The run's trials and metadata in ``DIR/trials.sqlite``.

    Example:
        >>> import tempfile
        >>> store = RunStore(tempfile.mkdtemp())
        >>> store.results()
        []
    """

    def __init__(self, run_dir: str | Path, readonly: bool = False):
        self.dir = Path(run_dir)
        self.path = self.dir / STORE_FILE
        if readonly:
            if not self.path.exists():
                raise ConfigError(f"{self.dir}: no rankwise run here (missing {STORE_FILE})")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30)
        else:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path, timeout=30)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(_SCHEMA)
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    # -- metadata -------------------------------------------------------------------------
    def get_meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def set_meta(self, key: str, value: Any) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                (key, json.dumps(value, sort_keys=True)),
            )

    def claim(self, identity: dict[str, Any], force: bool = False) -> bool:
        """Bind this directory to a configuration; refuse a different one unless ``force``.

        Returns True when a different run's trials were discarded (``force``).
        """
        stored = self.get_meta("identity")
        reset = stored is not None and bool(identity_diff(stored, identity))
        if reset:
            if not force:
                raise_if_different(self.dir, stored, identity)
            with self.db:
                self.db.execute("DELETE FROM trials")
        self.set_meta("identity", identity)
        self.discard_interrupted()
        return reset

    # -- trials ---------------------------------------------------------------------------
    def discard_interrupted(self) -> int:
        """Remove rows of trials that started but never finished; they will be redone."""
        with self.db:
            return self.db.execute("DELETE FROM trials WHERE status = 'running'").rowcount

    def forget(self, key: str) -> None:
        """Drop a ``skipped`` record (a budget decision, re-made on resume). Results stay."""
        with self.db:
            self.db.execute("DELETE FROM trials WHERE key = ? AND status = 'skipped'", (key,))

    def start(self, spec: TrialSpec) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO trials (key, rank, seed, grp, status, started_at, spec) "
                "VALUES (?, ?, ?, ?, 'running', ?, ?)",
                (spec.key, spec.rank, spec.seed, spec.group, time.time(), spec.to_json()),
            )

    def finish(self, result: TrialResult, spec: TrialSpec | None = None) -> None:
        """Record a result in one transaction (inserting the row if it never started)."""
        with self.db:
            row = self.db.execute(
                "SELECT status FROM trials WHERE key = ?", (result.key,)
            ).fetchone()
            if row is not None and row["status"] != "running":
                raise RuntimeError(f"trial {result.key} is already recorded")
            if row is None:
                self.db.execute(
                    "INSERT INTO trials (key, rank, seed, grp, status, started_at, spec) "
                    "VALUES (?, ?, ?, ?, 'running', ?, ?)",
                    (
                        result.key,
                        result.rank,
                        result.seed,
                        result.group,
                        time.time(),
                        spec.to_json() if spec else "{}",
                    ),
                )
            self.db.execute(
                "UPDATE trials SET status = ?, finished_at = ?, best_val_loss = ?, result = ? "
                "WHERE key = ?",
                (result.status, time.time(), result.best_val_loss, result.to_json(), result.key),
            )

    def annotate(self, key: str, **extra) -> TrialResult:
        """Merge ``extra`` into a finished trial's ``extra`` (None removes a key)."""
        with self.db:
            result = self.result(key)
            merged = {**result.extra, **extra}
            result = result.replace(extra={k: v for k, v in merged.items() if v is not None})
            self.db.execute(
                "UPDATE trials SET result = ? WHERE key = ?", (result.to_json(), result.key)
            )
        return result

    def result(self, key: str) -> TrialResult | None:
        row = self.db.execute(
            "SELECT result FROM trials WHERE key = ? AND status != 'running'", (key,)
        ).fetchone()
        return TrialResult.from_json(row["result"]) if row else None

    def results(self) -> list[TrialResult]:
        """Finished trials in the order they finished."""
        rows = self.db.execute(
            "SELECT result FROM trials WHERE status != 'running' ORDER BY finished_at, seq"
        ).fetchall()
        return [TrialResult.from_json(r["result"]) for r in rows]

    def running(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT key, rank, seed, grp, started_at FROM trials WHERE status = 'running'"
        ).fetchall()
        return [dict(r) for r in rows]

    def spec(self, key: str) -> TrialSpec | None:
        row = self.db.execute("SELECT spec FROM trials WHERE key = ?", (key,)).fetchone()
        return TrialSpec.from_json(row["spec"]) if row and row["spec"] != "{}" else None


def identity_diff(stored: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (a missing key is None)."""
    stored, new = _jsonable(stored), _jsonable(new)
    return [
        f"{k}: {stored.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(stored) | set(new))
        if stored.get(k) != new.get(k)
    ]


def raise_if_different(run_dir, stored: dict[str, Any], new: dict[str, Any]) -> None:
    """ConfigError listing what differs between a stored and a new configuration."""
    diffs = identity_diff(stored, new)
    if not diffs:
        return
    shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
    raise ConfigError(
        f"{run_dir} holds a run with a different configuration ({shown}); "
        "use another --out, or --force to start it over"
    )


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True))
