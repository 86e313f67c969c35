"""Experiment trackers: each trial logged as its own run, like HF Trainer's ``report_to``.

A tracker sees only finished :class:`~rankwise.records.TrialResult` records (and,
when given, the trial's spec), so it works the same whether the trial ran
in-process or on a remote worker, and it can replay a stored run afterwards.

Per trial it logs the hyperparameters (rank, lora_alpha, seed), the scalars
``train/loss`` and ``eval/loss`` at every recorded step (HF Trainer's names), and
the summary metrics (best_val_loss, trainable_params, ...).

Example:
    >>> import tempfile
    >>> from rankwise.records import TrialResult
    >>> tracker = make_tracker("none", tempfile.mkdtemp())
    >>> tracker.log_trial(TrialResult(key="r4-s0", rank=4, seed=0, status="complete"))
    >>> tracker.close()
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

from rankwise.errors import ConfigError
from rankwise.records import COMPLETE, SKIPPED, TrialResult

__all__ = ["Tracker", "make_tracker", "TRACKERS", "trial_params", "trial_metrics", "step_scalars"]

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")


class Tracker(Protocol):
    """Logs finished trials somewhere; one tracker run per trial."""

    def log_trial(self, result: TrialResult, spec: dict[str, Any] | None = None) -> None: ...

    def close(self) -> None: ...


def make_tracker(kind: str, run_dir: str | Path) -> Tracker:
    """The tracker for ``--report-to KIND``; a missing package is a one-line ConfigError."""
    makers = {
        "none": NullTracker,
        "tensorboard": TensorBoardTracker,
        "wandb": WandbTracker,
        "mlflow": MlflowTracker,
    }
    if kind not in makers:
        raise ConfigError(f"--report-to: expected one of {', '.join(TRACKERS)}, got {kind!r}")
    return makers[kind](Path(run_dir))


# -- what is logged, independent of the tracker ------------------------------------------
def trial_params(result: TrialResult, spec: Any = None) -> dict[str, Any]:
    """Hyperparameters of a trial (scalars only, as every tracker accepts them)."""
    spec = dataclasses.asdict(spec) if dataclasses.is_dataclass(spec) else (spec or {})
    lora = spec.get("lora") or {}
    params = {
        "rank": result.rank,
        "seed": result.seed,
        "status": result.status,
        "lora_alpha": result.lora_alpha
        if result.lora_alpha is not None
        else lora.get("lora_alpha"),
    }
    if "use_rslora" in lora:
        params["use_rslora"] = bool(lora["use_rslora"])
    for key in ("lr", "max_steps", "batch_size"):
        if key in (spec.get("train") or {}):
            params[key] = spec["train"][key]
    params["kind"] = str(result.kind)
    if result.group:
        params["group"] = result.group
    return {k: v for k, v in params.items() if v is not None}


def trial_metrics(result: TrialResult) -> dict[str, float]:
    """Summary numbers of a finished trial (those it has)."""
    values = {
        "best_val_loss": result.best_val_loss,
        "trainable_params": result.trainable_params,
        "final_train_loss": result.final_train_loss,
        "wall_seconds": result.wall_seconds,
        "peak_memory_bytes": result.peak_memory_bytes,
        "tokens_per_second": result.tokens_per_second,
        **{f"best_val_{k}": v for k, v in result.val_metrics.items()},
    }
    return {k: float(v) for k, v in values.items() if v is not None}


def step_scalars(result: TrialResult) -> dict[int, dict[str, float]]:
    """``{step: {"train/loss": x, "eval/loss": y}}`` in step order (wandb wants steps ascending)."""
    out: dict[int, dict[str, float]] = {}
    curves = [("train/loss", result.train_curve)]
    if result.metric == "loss":
        curves.append(("eval/loss", result.val_curve))
    else:  # the curve holds the error 1 - metric (rankwise.core.metrics): log the metric itself
        shown = [(s, 1.0 - v) for s, v in result.val_curve]
        curves += [("eval/loss", result.val_loss_curve), (f"eval/{result.metric}", shown)]
    for name, curve in curves:
        for step, loss in curve:
            out.setdefault(int(step), {})[name] = float(loss)
    return dict(sorted(out.items()))


def _run_name(key: str) -> str:
    """A trial key as a directory name; a hash keeps two keys that sanitise alike apart."""
    safe = re.sub(r"[^A-Za-z0-9._=-]+", "_", key).strip("._") or "trial"
    if safe != key:
        safe += "-" + hashlib.sha1(key.encode()).hexdigest()[:8]
    return safe


def _missing(kind: str, package: str) -> ConfigError:
    return ConfigError(
        f"--report-to {kind}: the {package} package is not installed (pip install {package})"
    )


# -- trackers ----------------------------------------------------------------------------
class NullTracker:
    """``--report-to none``: logs nothing."""

    def __init__(self, run_dir: Path | None = None):
        pass

    def log_trial(self, result: TrialResult, spec: dict[str, Any] | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Event files under ``RUN_DIR/tensorboard/<trial>``: ``tensorboard --logdir RUN_DIR/tensorboard``."""

    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self._writer_class, self._hparams = SummaryWriter, hparams
        self.dir = run_dir / "tensorboard"

    def log_trial(self, result: TrialResult, spec: dict[str, Any] | None = None) -> None:
        writer = self._writer_class(log_dir=str(self.dir / _run_name(result.key)))
        try:
            for step, scalars in step_scalars(result).items():
                for name, value in scalars.items():
                    writer.add_scalar(name, value, step)
            metrics = trial_metrics(result)
            for name, value in metrics.items():
                writer.add_scalar(name, value, result.best_step or result.steps)
            # The HParams plugin pairs these with the scalars of the same name in this run
            # (SummaryWriter.add_hparams would write them to a second, timestamped run).
            for summary in self._hparams(trial_params(result, spec), metrics):
                writer.file_writer.add_summary(summary)
        finally:
            writer.close()

    def close(self) -> None:
        pass


class WandbTracker:
    """One W&B run per trial, grouped by the run directory's name."""

    def __init__(self, run_dir: Path):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        self._wandb, self.dir = wandb, run_dir

    def log_trial(self, result: TrialResult, spec: dict[str, Any] | None = None) -> None:
        run = self._wandb.init(
            project="rankwise",
            group=self.dir.name,
            name=result.key,
            config=trial_params(result, spec),
            dir=str(self.dir),
        )
        try:
            for step, scalars in step_scalars(result).items():
                run.log(scalars, step=step)
            run.summary.update(trial_metrics(result))
        finally:
            run.finish()

    def close(self) -> None:
        pass


_MLFLOW_BATCH = 1000  # MLflow's limit on metrics per log_batch call


class MlflowTracker:
    """One MLflow run per trial in experiment ``rankwise/<run name>``.

    Honours ``MLFLOW_TRACKING_URI``; otherwise writes to ``RUN_DIR/mlruns``. Uses an
    explicit client, so no global MLflow state is touched.
    """

    def __init__(self, run_dir: Path):
        try:
            import mlflow
            from mlflow.entities import Metric, Param
        except ImportError:
            raise _missing("mlflow", "mlflow") from None
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        self._client, self._metric, self._param = mlflow.MlflowClient(uri), Metric, Param
        name = f"rankwise/{run_dir.resolve().name}"
        found = self._client.get_experiment_by_name(name)
        self._experiment = found.experiment_id if found else self._client.create_experiment(name)

    def log_trial(self, result: TrialResult, spec: dict[str, Any] | None = None) -> None:
        run_id = self._client.create_run(self._experiment, run_name=result.key).info.run_id
        now = int(time.time() * 1000)  # MLflow timestamps are milliseconds
        metrics = [
            self._metric(name, value, now, step)
            for step, scalars in step_scalars(result).items()
            for name, value in scalars.items()
        ]
        metrics += [
            self._metric(k, v, now, result.best_step or result.steps)
            for k, v in trial_metrics(result).items()
        ]
        params = [self._param(k, str(v)) for k, v in trial_params(result, spec).items()]
        for i in range(0, max(len(metrics), 1), _MLFLOW_BATCH):
            self._client.log_batch(
                run_id, metrics=metrics[i : i + _MLFLOW_BATCH], params=params if i == 0 else []
            )
        status = {COMPLETE: "FINISHED", SKIPPED: "KILLED"}.get(result.status, "FAILED")
        self._client.set_terminated(run_id, status)

    def close(self) -> None:
        pass
