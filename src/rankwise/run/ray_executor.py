"""The Ray executor (``--executor ray``): long-lived actors, one per worker slot, each holding
the base model; specs go in and results come out as JSON."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from rankwise.config import ExecutorConfig
from rankwise.errors import ConfigError
from rankwise.records import COMPLETE, FAILED, OUT_OF_MEMORY, TrialResult, TrialSpec
from rankwise.run.parallel import RETRIES, Arrival, _Job, annotated, drive_parallel, lost_result
from rankwise.storage.rundir import RunDir

INSTALL_HINT = "--executor ray: Ray is not installed; pip install rankwise[ray]"


# -- Ray ------------------------------------------------------------------------------------
class Worker:
    """One long-lived trial process (a Ray actor): loads the base model once, on its first
    trial, and trains every trial it is sent. Specs in, result records out, as JSON."""

    def __init__(self, threads: int = 1):
        import torch

        torch.set_num_threads(threads)  # one trial per worker: its share of the cores
        self.local: RunDir | None = None  # tokens and adapters when the disk is not shared

    def run(
        self,
        spec_json: str,
        task: tuple = (),
        tokens: list | None = None,
        trunk: dict | None = None,
    ) -> dict:
        """Train one trial (``task``: ``("nested",)`` for a nested-rank run, which its spec
        describes); ``tokens``: ``[ObjectRef]`` of the token blocks, or None to read
        them from the run directory; ``trunk``: a branch's trunk state (its files), sent
        along with the tokens when the run directory is not shared."""
        from rankwise.training.adapter import TrialContext
        from rankwise.training.trial import run_trial

        spec = TrialSpec.from_json(spec_json)
        ships_adapter = tokens is not None and bool(spec.adapter_dir)
        if tokens is not None:
            spec = self._localise(spec, tokens[0], trunk)
        spec = _visible_device(spec)
        ctx = TrialContext.for_spec(spec)
        if task:
            from rankwise.training.nested import run_nested

            results = run_nested(spec, ctx)
        else:
            results = [run_trial(spec, ctx)]
        from rankwise.training.resources import resident_bytes

        out = {
            "results": [r.to_json() for r in results],
            "healthy": _healthy(ctx.device, results),
            # What this worker's next trial starts from (its weights touched, freed heap
            # returned): the driver's memory predictions use it, not the driver's own RSS.
            "info": {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "resident_bytes": resident_bytes(ctx.device),
            },
        }
        if trunk:  # the trunk state it was sent is the driver's already: not sent back
            shutil.rmtree(spec.branch.checkpoint, ignore_errors=True)
        if ships_adapter:  # the driver's disk is not this worker's: send the adapter back
            out["files"] = _take_files(self.local.trials)
        return out

    def _localise(self, spec: TrialSpec, ref, trunk: dict | None = None) -> TrialSpec:
        """Token blocks from the object store, written once to a local folder; a trunk's
        state goes to (a branch: comes from) this worker's copy of its folder, which a
        trunk's result takes back with its adapter."""
        if self.local is None:
            import ray
            from safetensors.torch import save_file

            self.local = RunDir(tempfile.mkdtemp(prefix="rankwise-worker-"))
            self.local.data.mkdir()
            save_file(ray.get(ref), str(self.local.tokens))
        adapter = str(self.local.relocate(spec.adapter_dir)) if spec.adapter_dir else None
        if spec.branch is not None and spec.adapter_dir:
            driver = RunDir.of_adapter(spec.adapter_dir).path
            folder = self.local.path / Path(spec.branch.checkpoint).relative_to(driver)
            _write_files(folder, trunk or {})
            spec = spec.replace(branch=dataclasses.replace(spec.branch, checkpoint=str(folder)))
        return spec.replace(data_dir=str(self.local.data), adapter_dir=adapter)


def _visible_device(spec: TrialSpec) -> TrialSpec:
    """``cuda:N`` names a GPU of the driver's machine; a worker sees only its own GPU(s)."""
    device = str(spec.model.get("device", "auto"))
    if device.startswith("cuda:"):
        return spec.replace(model={**spec.model, "device": "cuda"})
    return spec


def _healthy(device: str, results: list[TrialResult]) -> bool:
    """False when a failure left the GPU unusable (a sticky CUDA error): replace the worker."""
    if not device.startswith("cuda") or all(r.status == COMPLETE for r in results):
        return True
    import torch

    try:
        torch.ones(1, device=device).add_(1)
        torch.cuda.synchronize()
        return True
    except Exception:  # any CUDA error here means the context is poisoned
        return False


def _take_files(root: Path) -> dict[str, bytes]:
    files = {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    shutil.rmtree(root, ignore_errors=True)
    return files


class RayPool:
    """``workers`` slots, each a :class:`Worker` actor started on first use and replaced when
    it dies. Actors are named per run directory, so leftovers of a run whose driver was
    killed are found and ended when the next search on that directory starts."""

    def __init__(self, workers: int, resources: dict, namespace: str, ship: Path | None = None):
        import ray

        self.ray, self.n, self.resources = ray, workers, resources
        self.namespace, self.ship, self.tokens = namespace, ship, None
        self.actors: dict[str, Any] = dict.fromkeys(f"w{i}" for i in range(workers))
        self.running: dict[Any, tuple[str, str, TrialSpec]] = {}  # ref -> (key, worker, spec)
        self.resident: dict[str, int] = {}  # worker -> resident bytes after its last trial
        self.started = 0
        self.remote = ray.remote(Worker)
        self.kill_leftovers()

    def kill_leftovers(self) -> int:
        ray, n = self.ray, 0
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == self.namespace:
                try:
                    ray.kill(ray.get_actor(entry["name"], namespace=self.namespace))
                    n += 1
                except ValueError:  # it died meanwhile
                    pass
        return n

    def free(self) -> int:
        return self.n - len(self.running)

    def _actor(self, worker: str):
        if self.actors[worker] is None:
            self.started += 1
            opts = {
                "name": f"rankwise-{worker}-{self.started}",
                "namespace": self.namespace,
                "num_cpus": self.resources.get("cpu", 1),
                "num_gpus": self.resources.get("gpu", 0),
                "max_restarts": 0,
            }
            if "memory" in self.resources:
                opts["memory"] = self.resources["memory"]
            threads = max(1, int(self.resources.get("cpu", 1)))
            self.actors[worker] = self.remote.options(**opts).remote(threads)
        return self.actors[worker]

    def submit(self, spec: TrialSpec, task: tuple = ()) -> str:
        busy = {w for _, w, _ in self.running.values()}
        worker = next(w for w in self.actors if w not in busy)
        if self.ship is not None and self.tokens is None:  # once, on the first trial
            self.tokens = self.ray.put(_token_arrays(self.ship))
        tokens = None if self.tokens is None else [self.tokens]
        trunk = _trunk_files(spec) if self.tokens is not None else None
        ref = self._actor(worker).run.remote(spec.to_json(), task, tokens, trunk)
        self.running[ref] = (spec.key, worker, spec)
        return worker

    def wait(self) -> Arrival:
        ray = self.ray
        (ref,), _ = ray.wait(list(self.running), num_returns=1)
        key, worker, spec = self.running.pop(ref)
        try:
            out = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # our code raised: a failed trial
            cause = exc.cause if exc.cause is not None else exc
            return Arrival(key, worker, [lost_result(spec, _one_line(cause))])
        except ray.exceptions.RayError as exc:  # the worker died: actor, process or node
            self._replace(worker)
            return Arrival(key, worker, None, _one_line(exc))
        results = [TrialResult.from_json(r) for r in out["results"]]
        # A branch trained from the worker's copy of its trunk's state: recorded as the driver's.
        results = [r.replace(branch=spec.branch) if r.branch else r for r in results]
        if "resident_bytes" in out["info"]:
            self.resident[worker] = int(out["info"]["resident_bytes"])
        if not out["healthy"]:
            self._replace(worker)
            if not any(r.status == COMPLETE or r.reason.startswith(OUT_OF_MEMORY) for r in results):
                return Arrival(key, worker, None, f"GPU unusable after: {results[0].reason}")
        if "files" in out and spec.adapter_dir:
            _write_files(RunDir.of_adapter(spec.adapter_dir).trials, out["files"])
        return Arrival(key, worker, results, info=out["info"])

    def cancel(self, key: str) -> None:
        for ref, (k, worker, _) in list(self.running.items()):
            if k == key:
                del self.running[ref]
                self._replace(worker)

    def _replace(self, worker: str) -> None:
        actor, self.actors[worker] = self.actors[worker], None
        if actor is not None:
            self.ray.kill(actor)

    def close(self) -> None:
        for worker in self.actors:
            self._replace(worker)
        self.running.clear()


def _trunk_files(spec: TrialSpec) -> dict[str, bytes] | None:
    """A branch's trunk state, for a worker that does not share the run directory."""
    if spec.branch is None or spec.branch.is_trunk:
        return None
    folder = Path(spec.branch.checkpoint)
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _one_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


class RayExecutor:
    """Trials on Ray workers: the search in parallel (:func:`drive_parallel`), other trials
    (learning-rate calibration, co-tuning, a nested run, its final trial) one at a time."""

    def __init__(self, cfg: ExecutorConfig, run_dir: Path, progress):
        try:
            import ray
        except ImportError:
            raise ConfigError(INSTALL_HINT) from None
        self.cfg, self.progress, self.ray = cfg, progress, ray
        self.owned = _connect(ray, cfg.ray_address)
        resources, workers = _plan(ray.cluster_resources(), cfg)
        # Joining a cluster, the nodes may not share the run directory: ship the tokens.
        ship = Path(run_dir) if cfg.ray_address is not None else None
        digest = hashlib.sha256(str(Path(run_dir).absolute()).encode()).hexdigest()[:12]
        self.pool = RayPool(workers, resources, f"rankwise-{digest}", ship)
        shown = ",".join(f"{k}={v:g}" for k, v in resources.items())
        progress.log(f"ray: {workers} workers, {shown} per trial")

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.pool.close()
        if self.owned:
            self.ray.shutdown()

    def drive(self, strategy, runner, variant, on_result=None):
        return drive_parallel(strategy, runner, variant, self.pool, on_result)

    def resident_bytes(self, device: str) -> int | None:
        """The most any worker held after its last trial (None before the first result):
        the memory baseline of the next trial's prediction, whichever worker runs it
        (:meth:`rankwise.run.runner.TrialRunner.predict`)."""
        return max(self.pool.resident.values(), default=None)

    def execute(self, spec: TrialSpec, progress=None, task: tuple = ()) -> TrialResult:
        return self._one(spec, task)[0]

    def nested(self, spec, ctx, progress=None):
        return self._one(spec, ("nested",))

    def _one(self, spec: TrialSpec, task: tuple) -> list[TrialResult]:
        """One task on a free worker, retried once if the worker is lost."""
        attempts: list[dict] = []
        while True:
            worker = self.pool.submit(spec, task)
            self.progress.log(f"{worker}: started {spec.key}")
            a = self.pool.wait()
            if a.results is not None:
                break
            attempts.append({"worker": a.worker, "status": FAILED, "reason": a.lost})
            if len(attempts) > RETRIES:
                a = Arrival(a.key, a.worker, [lost_result(spec, f"worker lost: {a.lost}")])
                break
            self.progress.log(f"{a.worker}: lost during {spec.key} ({a.lost}); retrying")
        job = _Job(spec, {}, speculative=False, attempts=attempts)
        return [annotated(r, job, a) for r in a.results]


def _connect(ray, address: str | None) -> bool:
    """Join or start Ray; True if this process started it (and so ends it)."""
    if ray.is_initialized():
        return False
    import logging

    kw: dict = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if address is None:
        # Ray runs workers at niceness 15 so its own daemons stay responsive; here the
        # workers are the search's work and get the priority the local executor has.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(**kw)
        return True
    if address not in ("auto", "local") and not address.startswith("ray://"):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--ray-address: cannot reach {address} ({exc})") from None
    try:
        ray.init(address=address, **kw)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ConfigError(f"--ray-address: cannot join {address} ({_one_line(exc)})") from None
    return False


def _plan(cluster: dict, cfg: ExecutorConfig) -> tuple[dict, int]:
    """Resources per trial and the number of workers that fit the cluster."""
    resources = cfg.trial_resources or ({"gpu": 1.0} if cluster.get("GPU") else {"cpu": 1.0})
    have = {"cpu": cluster.get("CPU", 0), "gpu": cluster.get("GPU", 0)}
    have["memory"] = cluster.get("memory", 0)
    need = {"cpu": 1.0, **resources}
    fits = min(int(have[k] // v) for k, v in need.items() if v > 0)
    if fits < 1:
        shown = ", ".join(f"{k}={have[k]:g}" for k in need)
        raise ConfigError(f"--trial-resources: one trial needs more than the cluster has ({shown})")
    return resources, min(cfg.workers or fits, fits)


def _token_arrays(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(RunDir(run_dir).tokens))
