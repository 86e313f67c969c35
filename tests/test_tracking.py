"""Trackers: TensorBoard written and read back; wandb and MLflow against small fakes
(neither is a dependency), and their one-line error when the package is missing."""

from __future__ import annotations

import sys
import types
from collections import namedtuple

import pytest

from rankwise.errors import ConfigError
from rankwise.records import COMPLETE, FAILED, TrialResult
from rankwise.report.tracking import make_tracker, step_scalars, trial_metrics, trial_params

SPEC = {
    "lora": {"r": 8, "lora_alpha": 16.0, "use_rslora": False},
    "train": {"lr": 2e-4, "max_steps": 30},
}


def result(**kw) -> TrialResult:
    fields = dict(
        key="r8-s1",
        rank=8,
        seed=1,
        status=COMPLETE,
        lora_alpha=16.0,
        best_val_loss=2.5,
        best_step=20,
        trainable_params=98_304,
        steps=30,
        train_curve=[(0, 4.0), (10, 3.0), (20, 2.6), (30, 2.4)],
        val_curve=[(10, 3.1), (20, 2.5), (30, 2.55)],
        wall_seconds=12.5,
    )
    return TrialResult(**{**fields, **kw})


def test_what_is_logged():
    assert trial_params(result(), SPEC) == {
        "rank": 8,
        "seed": 1,
        "status": COMPLETE,
        "lora_alpha": 16.0,
        "use_rslora": False,
        "lr": 2e-4,
        "max_steps": 30,
        "kind": "main",
    }
    assert trial_params(result(lora_alpha=None), None)["rank"] == 8
    assert trial_metrics(result())["best_val_loss"] == 2.5
    assert "peak_memory_bytes" not in trial_metrics(result())  # not measured: not logged
    assert step_scalars(result())[20] == {"train/loss": 2.6, "eval/loss": 2.5}
    assert list(step_scalars(result())) == [0, 10, 20, 30]


def test_tensorboard_events_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = make_tracker("tensorboard", tmp_path)
    tracker.log_trial(result(), SPEC)
    tracker.log_trial(
        result(
            key="r/16 s0",
            rank=16,
            seed=0,
            status=FAILED,
            reason="NaN",
            best_val_loss=None,
            train_curve=[(0, 4.0)],
            val_curve=[],
        )
    )
    tracker.close()

    runs = sorted(p.name for p in (tmp_path / "tensorboard").iterdir())
    assert runs[0] == "r8-s1" and runs[1].startswith("r_16_s0-")  # sanitised, kept apart
    events = EventAccumulator(str(tmp_path / "tensorboard" / "r8-s1")).Reload()
    read = {
        tag: [(e.step, round(e.value, 4)) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
    assert read["train/loss"] == [(0, 4.0), (10, 3.0), (20, 2.6), (30, 2.4)]
    assert read["eval/loss"] == [(10, 3.1), (20, 2.5), (30, 2.55)]
    assert read["best_val_loss"] == [(20, 2.5)]
    assert read["trainable_params"] == [(20, 98304.0)]
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(hparams)
    assert b"lora_alpha" in hparams["_hparams_/session_start_info"]


def test_none_is_a_no_op(tmp_path):
    tracker = make_tracker("none", tmp_path)
    tracker.log_trial(result())
    tracker.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_tracker():
    with pytest.raises(ConfigError, match="--report-to: expected one of none, tensorboard"):
        make_tracker("comet", "/tmp")


@pytest.mark.parametrize("kind", ["wandb", "mlflow"])
def test_missing_package_is_a_one_line_error(monkeypatch, tmp_path, kind):
    monkeypatch.setitem(sys.modules, kind, None)  # makes `import kind` raise ImportError
    with pytest.raises(ConfigError) as err:
        make_tracker(kind, tmp_path)
    assert str(err.value) == (
        f"--report-to {kind}: the {kind} package is not installed (pip install {kind})"
    )


class _FakeWandbRun:
    def __init__(self, calls, **init):
        self.calls, self.summary = calls, {}
        calls.append(("init", init))

    def log(self, scalars, step):
        self.calls.append(("log", step, scalars))

    def finish(self):
        self.calls.append(("finish", self.summary))


def test_wandb_logs_one_run_per_trial(monkeypatch, tmp_path):
    calls: list = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: _FakeWandbRun(calls, **kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tracker = make_tracker("wandb", tmp_path)
    tracker.log_trial(result(), SPEC)
    tracker.close()
    init = calls[0][1]
    assert (init["name"], init["group"], init["config"]["rank"]) == ("r8-s1", tmp_path.name, 8)
    assert ("log", 20, {"train/loss": 2.6, "eval/loss": 2.5}) in calls
    assert [c[1] for c in calls if c[0] == "log"] == [0, 10, 20, 30]
    assert calls[-1] == ("finish", trial_metrics(result()))


class _FakeMlflowClient:
    def __init__(self, uri):
        self.uri, self.batches, self.ended = uri, [], {}

    def get_experiment_by_name(self, name):
        return None

    def create_experiment(self, name):
        self.experiment = name
        return "1"

    def create_run(self, experiment_id, run_name):
        info = types.SimpleNamespace(run_id=f"id-{run_name}")
        return types.SimpleNamespace(info=info)

    def log_batch(self, run_id, metrics, params):
        self.batches.append((run_id, metrics, params))

    def set_terminated(self, run_id, status):
        self.ended[run_id] = status


def test_mlflow_logs_one_run_per_trial(monkeypatch, tmp_path):
    fake, entities = types.ModuleType("mlflow"), types.ModuleType("mlflow.entities")
    fake.MlflowClient = _FakeMlflowClient
    entities.Metric = namedtuple("Metric", "key value timestamp step")
    entities.Param = namedtuple("Param", "key value")
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setitem(sys.modules, "mlflow.entities", entities)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker = make_tracker("mlflow", tmp_path)
    tracker.log_trial(result(), SPEC)
    tracker.log_trial(result(key="r16-s0", rank=16, status=FAILED, reason="NaN"))
    client = tracker._client
    assert client.uri == (tmp_path / "mlruns").resolve().as_uri()
    run_id, metrics, params = client.batches[0]
    assert run_id == "id-r8-s1" and ("rank", "8") in [tuple(p) for p in params]
    assert [(m.step, m.value) for m in metrics if m.key == "eval/loss"] == [
        (10, 3.1),
        (20, 2.5),
        (30, 2.55),
    ]
    assert client.ended == {"id-r8-s1": "FINISHED", "id-r16-s0": "FAILED"}
