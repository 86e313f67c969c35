"""Persistence of a run: one SQLite file, one row per trial.

A trial's row is written ``running`` when it starts and replaced by its result in
one transaction when it ends, so a crash (Ctrl-C, kill -9, power loss) leaves at
worst a ``running`` row, which the next run discards and redoes. A finished row's
result is never rewritten; only an annotation may change (:meth:`RunStore.annotate`:
whether a trial run ahead by a parallel search turned out to be needed). WAL mode lets
``rankwise show``/``report`` read while a search writes.

A store is checked when it is opened, so every caller gets the same one-line
:class:`UnreadableStore` (a :class:`~rankwise.errors.ConfigError`) instead of a
``sqlite3.DatabaseError`` traceback: a file that is not a database, a damaged or truncated
one (``PRAGMA quick_check``), a database without the store's tables or columns, or one
written by a newer rankwise (``PRAGMA user_version`` above :data:`SCHEMA_VERSION`). The
check writes nothing: the file is left as it was found, for a backup to replace it.
"""

from __future__ import annotations

import functools
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from rankwise.errors import ConfigError
from rankwise.records import TrialResult, TrialSpec

__all__ = [
    "RunStore",
    "SCHEMA_VERSION",
    "STORE_FILE",
    "UnreadableStore",
    "identity_diff",
    "raise_if_different",
    "remove_store",
]

STORE_FILE = "trials.sqlite"

# PRAGMA user_version of the stores this rankwise writes. 0 is a store written before the
# version was recorded (the same tables as 1). Raise it when a change would make an older
# rankwise misread a store; an older rankwise then refuses the newer store in one line.
SCHEMA_VERSION = 1

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

# SQLite's companions of a WAL database (its log and the log's shared-memory index).
_SIDE_FILES = ("-wal", "-shm")


class UnreadableStore(ConfigError):
    """``DIR/trials.sqlite`` exists but is not a store this rankwise can use.

    The message is one line: the file, the problem, the fix and the alternative
    (:meth:`otherwise` swaps the alternative, e.g. for ``--force``).

    Example:
        >>> e = UnreadableStore(Path("r/trials.sqlite"), "damaged")
        >>> str(e)
        'r/trials.sqlite: damaged; restore it from a backup, or remove r to discard the run'
        >>> str(e.otherwise("pass --force"))
        'r/trials.sqlite: damaged; restore it from a backup, or pass --force'
    """

    def __init__(
        self,
        path: Path,
        problem: str,
        fix: str = "restore it from a backup",
        alternative: str | None = None,
    ):
        self.path, self.problem, self.fix = Path(path), problem, fix
        self.alternative = alternative or f"remove {self.path.parent} to discard the run"
        super().__init__(f"{self.path}: {problem}; {fix}, or {self.alternative}")

    def otherwise(self, alternative: str) -> UnreadableStore:
        """The same error with another way out after the fix."""
        return UnreadableStore(self.path, self.problem, self.fix, alternative)


class RunStore:
    """The run's trials and metadata in ``DIR/trials.sqlite``.

    ``readonly`` opens an existing store for reading (``rankwise show``/``report``);
    otherwise the directory and the store are created if missing. Either way a file that
    is not a usable store raises :class:`UnreadableStore` and is left untouched.

    Example:
        >>> import tempfile
        >>> store = RunStore(tempfile.mkdtemp())
        >>> store.results()
        []
    """

    def __init__(self, run_dir: str | Path, readonly: bool = False):
        self.dir = Path(run_dir)
        self.path = self.dir / STORE_FILE
        if readonly and not self.path.exists():
            raise ConfigError(f"{self.dir}: no rankwise run here (missing {STORE_FILE})")
        if not readonly:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.db = _open(self.path, readonly)
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

    def times(self) -> dict[str, tuple[float, float | None]]:
        """When each trial started and finished (``time.time()``; None while it runs)."""
        rows = self.db.execute("SELECT key, started_at, finished_at FROM trials").fetchall()
        return {r["key"]: (r["started_at"], r["finished_at"]) for r in rows}

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


def remove_store(run_dir: str | Path) -> None:
    """Delete ``DIR/trials.sqlite`` and SQLite's companions of it (``--force`` on a store
    that cannot be read; no connection may be open)."""
    path = Path(run_dir) / STORE_FILE
    for suffix in ("", *_SIDE_FILES, "-journal"):  # -journal: a rollback-mode database's
        _side(path, suffix).unlink(missing_ok=True)


# -- opening --------------------------------------------------------------------------------
def _open(path: Path, readonly: bool) -> sqlite3.Connection:
    """A connection to the store at ``path``, checked before anything is written to it."""
    new = not path.exists() or path.stat().st_size == 0
    before = {s for s in _SIDE_FILES if _side(path, s).exists()}
    if readonly:  # a URI, percent-encoded, so any directory name is read as a path
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
    else:
        db = sqlite3.connect(path, timeout=30)
    try:
        _check(db, path, empty_ok=new and not readonly)
        if not readonly:
            db.execute("PRAGMA journal_mode=WAL")  # after the check: it rewrites the header
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        return db
    except UnreadableStore:
        db.close()
        raise
    except sqlite3.OperationalError as exc:  # locked, no permission: not damage
        db.close()
        raise ConfigError(f"{path}: cannot open the store ({_one_line(exc)})") from None
    except sqlite3.DatabaseError as exc:  # not a database, or not a whole one
        db.close()
        # A read-only connection leaves SQLite's companions behind. No search can be using
        # a damaged file, so those this open created go, and the directory is as it was.
        for s in set(_SIDE_FILES) - before:
            _side(path, s).unlink(missing_ok=True)
        raise UnreadableStore(path, f"not a readable rankwise store ({_one_line(exc)})") from None


def _check(db: sqlite3.Connection, path: Path, empty_ok: bool) -> None:
    """Raise :class:`UnreadableStore` unless ``db`` is a store of a known version (or,
    ``empty_ok``, an empty database about to become one), and ``sqlite3.DatabaseError``
    if it is damaged. Reads only."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise UnreadableStore(
            path,
            f"written by a newer rankwise (store schema {version}; this one reads "
            f"{SCHEMA_VERSION} and older)",
            fix="upgrade rankwise",
        )
    problems = [row[0] for row in db.execute("PRAGMA quick_check")]
    if problems != ["ok"]:  # damage SQLite finds only by reading every page
        raise sqlite3.DatabaseError(_one_line(problems))
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables and empty_ok:
        return
    for table, columns in _columns().items():
        if table not in tables:
            what = "an empty database" if not tables else f"a database without a {table} table"
            raise UnreadableStore(path, f"not a rankwise store ({what})")
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if missing := [c for c in columns if c not in have]:
            raise UnreadableStore(
                path,
                f"not a rankwise store of this version (table {table} has no column "
                f"{', '.join(missing)})",
            )


@functools.cache
def _columns() -> dict[str, list[str]]:
    """Each table's columns, read from :data:`_SCHEMA` itself (one declaration)."""
    db = sqlite3.connect(":memory:")
    db.executescript(_SCHEMA)
    names = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    out = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})")] for t in names}
    db.close()
    return {t: cols for t, cols in out.items() if not t.startswith("sqlite_")}


def _side(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _one_line(problem: Exception | list[str]) -> str:
    """The first meaningful line of an SQLite error or of ``quick_check``'s report."""
    text = "\n".join(problem) if isinstance(problem, list) else str(problem)
    lines = [s.strip() for s in text.splitlines() if s.strip() and not s.startswith("***")]
    return (lines[0] if lines else type(problem).__name__)[:200]
