"""The run directory: its paths, its lock, its identity, and the delivered answer.

``DIR/`` holds ``trials.sqlite`` (the store), ``data/tokens.safetensors`` (the token blocks
every trial reads), ``data/retain.safetensors`` (the retain set forgetting is measured on),
``trials/<key>/adapter`` (each trial's best adapter), ``trials/<key>/trunk`` (with
``--branch-at``: a trunk trial's training state at the branch step, where its seed's other
ranks start; safetensors and JSON), ``adapter`` (the recommended one),
``recommendation.json``, ``summary.md`` and ``report.html``. Every one of
these paths is a :class:`RunDir` property or method, so the layout is written down once;
a trial that knows only its adapter folder finds its run directory with
:meth:`RunDir.of_adapter`.

One search at a time: :meth:`RunDir.locked` holds an OS file lock (``filelock``) on
``DIR/.rankwise.lock`` for the whole search, so a second search on a live directory is
refused (with the owner's pid and start time) instead of racing it. The OS drops the lock
when its process dies, even by ``kill -9``: a lock left behind is then simply taken over.
``rankwise show`` and ``report`` only read, and need no lock.

The identity of a run is its whole resolved configuration (defaults included) and a
fingerprint of its token blocks; a resumed search must match both. A store that cannot be
read (:class:`~rankwise.storage.store.UnreadableStore`) is refused and left as it is, unless
``--force`` starts the run again (:meth:`RunDir.open_store`).

Example:
    >>> import tempfile
    >>> d = RunDir(tempfile.mkdtemp())
    >>> with d.locked():
    ...     d.owner()["pid"] == os.getpid()
    True
    >>> d.trial_adapter("lr-0.001/r4-s0").parts[-2:]
    ('lr-0.001_r4-s0', 'adapter')
    >>> RunDir.of_adapter(d.trial_adapter("r4-s0")).path == d.path
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rankwise.errors import ConfigError
from rankwise.storage.store import (
    STORE_FILE,
    RunStore,
    UnreadableStore,
    raise_if_different,
    remove_store,
)

__all__ = [
    "ADAPTER_DIR",
    "OUTPUTS",
    "RECOMMENDATION_FILE",
    "REPORT_FILE",
    "SUMMARY_FILE",
    "RunDir",
    "data_fingerprint",
]

DATA_DIR = "data"
TOKENS_FILE = "tokens.safetensors"  # the run's packed token blocks (rankwise.io.data writes it)
RETAIN_FILE = "retain.safetensors"
TRIALS_DIR = "trials"
ADAPTER_DIR = "adapter"  # the delivered adapter, and each trial's, inside its key's folder
TRUNK_DIR = "trunk"  # a trunk trial's saved training state, inside its key's folder
TRUNK_TENSORS = "state.safetensors"  # ... its adapter, optimizer moments, RNG and data order
TRUNK_META = "state.json"  # ... everything else; written last: the state exists iff it does
RECOMMENDATION_FILE = "recommendation.json"
SUMMARY_FILE = "summary.md"
REPORT_FILE = "report.html"
LOCK_FILE = ".rankwise.lock"
OWNER_FILE = ".rankwise.owner.json"
# What a search writes besides the store and the token cache; removed when --force restarts.
OUTPUTS = (ADAPTER_DIR, TRIALS_DIR, RECOMMENDATION_FILE, REPORT_FILE, SUMMARY_FILE)
FORCE_HINT = "pass --force to start the run again"


class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def of_adapter(cls, adapter_dir: str | Path) -> RunDir:
        """The run directory holding a trial's adapter folder ``DIR/trials/<key>/adapter``
        (a worker's or a nested run's way back from ``TrialSpec.adapter_dir``)."""
        p = Path(adapter_dir)
        if p.name != ADAPTER_DIR or p.parent.parent.name != TRIALS_DIR:
            raise ValueError(f"{p} is not a trial adapter folder (DIR/trials/<key>/adapter)")
        return cls(p.parent.parent.parent)

    # -- paths ----------------------------------------------------------------------------
    @property
    def store(self) -> Path:
        return self.path / STORE_FILE

    @property
    def data(self) -> Path:
        """The token cache's folder (``TrialSpec.data_dir``)."""
        return self.path / DATA_DIR

    @property
    def tokens(self) -> Path:
        return self.data / TOKENS_FILE

    @property
    def retain(self) -> Path:
        """The retain set and the base model's figures on it (rankwise.training.retain)."""
        return self.data / RETAIN_FILE

    @property
    def trials(self) -> Path:
        """The folder of every trial's adapter folder."""
        return self.path / TRIALS_DIR

    def trial_adapter(self, key: str) -> Path:
        """Trial ``key``'s best adapter (a key's ``/`` becomes ``_``: one folder per trial)."""
        return self.trials / key.replace("/", "_") / ADAPTER_DIR

    def trunk_checkpoint(self, key: str) -> Path:
        """Trial ``key``'s training state at the branch step, when it is a trunk
        (``--branch-at``; rankwise.training.branch writes and reads it)."""
        return self.trials / key.replace("/", "_") / TRUNK_DIR

    def relocate(self, adapter_dir: str | Path) -> Path:
        """This directory's folder for the trial whose adapter folder is ``adapter_dir`` in
        another run directory (a Ray worker's local copy of the driver's)."""
        return self.path / Path(adapter_dir).relative_to(RunDir.of_adapter(adapter_dir).path)

    @property
    def adapter(self) -> Path:
        """The delivered adapter: a copy of the recommended trial's."""
        return self.path / ADAPTER_DIR

    @property
    def recommendation(self) -> Path:
        return self.path / RECOMMENDATION_FILE

    @property
    def summary(self) -> Path:
        return self.path / SUMMARY_FILE

    @property
    def report(self) -> Path:
        return self.path / REPORT_FILE

    @property
    def lock_file(self) -> Path:
        return self.path / LOCK_FILE

    @property
    def owner_file(self) -> Path:
        return self.path / OWNER_FILE

    def has_store(self) -> bool:
        return self.store.exists()

    # -- checks before anything is written ------------------------------------------------
    def check_writable(self) -> None:
        d = self.path
        if d.exists() and not d.is_dir():
            raise ConfigError(f"--out: {d} exists and is not a directory")
        probe = d if d.exists() else next(p for p in d.absolute().parents if p.exists())
        if not probe.is_dir():
            raise ConfigError(f"--out: cannot create {d}: {probe} is not a directory")
        if not os.access(probe, os.W_OK):
            raise ConfigError(f"--out: cannot write to {d} (permission denied on {probe})")

    def check_identity(self, identity: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
        """Refuse a stored run with a different configuration (``ignore``: keys not known
        yet, such as the data fingerprint before the data is read), or a store that cannot
        be read (the way out named is ``--force``)."""
        if not self.has_store():
            return
        try:
            ro = RunStore(self.path, readonly=True)
        except UnreadableStore as exc:
            raise exc.otherwise(FORCE_HINT) from None
        try:
            stored = ro.get_meta("identity")
        finally:
            ro.close()
        if stored is not None:
            new = {**identity, **{k: stored[k] for k in ignore if k in stored}}
            raise_if_different(self.path, stored, new)

    # -- the store ------------------------------------------------------------------------
    def open_store(self, force: bool = False) -> RunStore:
        """The store, opened for a search. One that cannot be read is refused and left as
        it is, unless ``force``: then it is removed with the outputs it recorded (the token
        cache stays: it is checked against its own fingerprint) and the run starts again."""
        try:
            return RunStore(self.path)
        except UnreadableStore as exc:
            if not force:
                raise exc.otherwise(FORCE_HINT) from None
        except OSError as exc:
            raise ConfigError(f"--out: cannot write to {self.path} ({exc})") from None
        remove_store(self.path)
        self.clear_outputs()
        return RunStore(self.path)

    # -- the lock -------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[dict | None]:
        """Hold the directory for one search; yields the owner record of a lock that was
        left behind by a dead process (and is now taken over), else None."""
        from filelock import FileLock, Timeout

        self.check_writable()
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_file), thread_local=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            owner = self.owner() or {}
            raise ConfigError(
                f"{self.path} is in use by pid {owner.get('pid', '?')} "
                f"(started {owner.get('started', '?')}); wait for it or use another --out"
            ) from None
        stale = self.owner()
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
        self.owner_file.write_text(json.dumps({"pid": os.getpid(), "started": started}))
        try:
            yield stale
        finally:
            self.owner_file.unlink(missing_ok=True)
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)
            if created and not any(self.path.iterdir()):
                self.path.rmdir()  # a search refused before writing anything leaves nothing

    def owner(self) -> dict | None:
        try:
            return json.loads(self.owner_file.read_text())
        except (OSError, ValueError):
            return None

    # -- writing the answer ---------------------------------------------------------------
    def clear_outputs(self) -> None:
        """Remove what a search wrote besides the store and the token cache."""
        for name in OUTPUTS:
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def deliver_adapter(self, key: str) -> Path:
        """Copy trial ``key``'s adapter to ``DIR/adapter`` (atomically replaced)."""
        tmp = self.adapter.with_name(self.adapter.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.trial_adapter(key), tmp)
        shutil.rmtree(self.adapter, ignore_errors=True)
        tmp.rename(self.adapter)
        return self.adapter

    def write_json(self, name: str | Path, doc: dict) -> Path:
        """Write ``DIR/name`` (or a path such as :attr:`recommendation`) atomically: a
        reader never sees half a file."""
        path = Path(name)
        if path.parent != self.path:  # a bare name (a path of this run stays as it is)
            path = self.path / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2))
        tmp.replace(path)
        return path


def data_fingerprint(data) -> str:
    """sha256 of the token blocks and loss masks a run trains and evaluates on."""
    h = hashlib.sha256()
    for name in ("train_ids", "train_labels", "val_ids", "val_labels"):
        t = getattr(data, name).contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
