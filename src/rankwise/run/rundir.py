"""The run directory: its paths, its lock, its identity, and the delivered answer.

``DIR/`` holds ``trials.sqlite`` (the store), ``data/tokens.safetensors`` (the token blocks
every trial reads), ``trials/<key>/adapter`` (each trial's best adapter), ``adapter`` (the
recommended one), ``recommendation.json``, ``summary.md`` and ``report.html``.

One search at a time: :meth:`RunDir.locked` holds an OS file lock (``filelock``) on
``DIR/.rankwise.lock`` for the whole search, so a second search on a live directory is
refused (with the owner's pid and start time) instead of racing it. The OS drops the lock
when its process dies, even by ``kill -9``: a lock left behind is then simply taken over.
``rankwise show`` and ``report`` only read, and need no lock.

The identity of a run is its whole resolved configuration (defaults included) and a
fingerprint of its token blocks; a resumed search must match both.

Example:
    >>> import tempfile
    >>> d = RunDir(tempfile.mkdtemp())
    >>> with d.locked():
    ...     d.owner()["pid"] == os.getpid()
    True
    >>> d.trial_adapter("lr-0.001/r4-s0").parts[-2:]
    ('lr-0.001_r4-s0', 'adapter')
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
from rankwise.run.store import STORE_FILE, RunStore, raise_if_different

__all__ = ["RunDir", "data_fingerprint", "OUTPUTS"]

LOCK_FILE = ".rankwise.lock"
OWNER_FILE = ".rankwise.owner.json"
# What a search writes besides the store and the token cache; removed when --force restarts.
OUTPUTS = ("adapter", "trials", "recommendation.json", "report.html", "summary.md")


class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # -- paths ----------------------------------------------------------------------------
    @property
    def data(self) -> Path:
        return self.path / "data"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    def trial_adapter(self, key: str) -> Path:
        return self.path / "trials" / key.replace("/", "_") / "adapter"

    def has_store(self) -> bool:
        return (self.path / STORE_FILE).exists()

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
        yet, such as the data fingerprint before the data is read)."""
        if not self.has_store():
            return
        ro = RunStore(self.path, readonly=True)
        try:
            stored = ro.get_meta("identity")
        finally:
            ro.close()
        if stored is not None:
            new = {**identity, **{k: stored[k] for k in ignore if k in stored}}
            raise_if_different(self.path, stored, new)

    # -- the lock -------------------------------------------------------------------------
    @contextmanager
    def locked(self) -> Iterator[dict | None]:
        """Hold the directory for one search; yields the owner record of a lock that was
        left behind by a dead process (and is now taken over), else None."""
        from filelock import FileLock, Timeout

        self.check_writable()
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / LOCK_FILE), thread_local=False)
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
        owner_file = self.path / OWNER_FILE
        owner_file.write_text(json.dumps({"pid": os.getpid(), "started": started}))
        try:
            yield stale
        finally:
            owner_file.unlink(missing_ok=True)
            lock.release()
            Path(lock.lock_file).unlink(missing_ok=True)
            if created and not any(self.path.iterdir()):
                self.path.rmdir()  # a search refused before writing anything leaves nothing

    def owner(self) -> dict | None:
        try:
            return json.loads((self.path / OWNER_FILE).read_text())
        except (OSError, ValueError):
            return None

    # -- writing the answer ---------------------------------------------------------------
    def clear_outputs(self) -> None:
        for name in OUTPUTS:
            p = self.path / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)

    def deliver_adapter(self, key: str) -> Path:
        """Copy trial ``key``'s adapter to ``DIR/adapter`` (atomically replaced)."""
        tmp = self.path / "adapter.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.trial_adapter(key), tmp)
        shutil.rmtree(self.adapter, ignore_errors=True)
        tmp.rename(self.adapter)
        return self.adapter

    def write_json(self, name: str, doc: dict) -> Path:
        """Write ``DIR/name`` atomically (a reader never sees half a file)."""
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
