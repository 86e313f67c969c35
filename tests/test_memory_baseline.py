"""The peak-memory prediction counts what is resident when a trial starts
(``TrialRunner.predict``): memory the search holds beyond the Study's baseline, a Ray
worker's own memory; freed heap is returned before a trial is measured or predicted."""

from __future__ import annotations

import sys
import types

import pytest
import torch

import rankwise
import rankwise.io.data
from rankwise.analysis.estimate import estimate
from rankwise.config import Options
from rankwise.run.parallel import _Job, annotated
from rankwise.run.ray_executor import RayExecutor, RayPool, Worker
from rankwise.study.study import Study
from rankwise.testing import tiny_model
from rankwise.training.resources import PeakMemory, current_rss, live_rss, trim_heap

from .conftest import fast_args

MiB = 2**20
BUFFER = 256 * MiB  # what the search holds beyond its start (a data set, a retain set)


def options(llama_dir, text_jsonl, out, **over) -> dict:
    return dict(
        model=str(llama_dir), train=str(text_jsonl), out=str(out), ranks=[1], start_rank=1,
        **fast_args(**over),
    )  # fmt: skip


def old_prediction(start: int) -> int:
    """What the search predicted for r=1 before: the Study's baseline + the estimate."""
    kw = dict(ranks=[1], target_modules=["q_proj", "v_proj"], batch_size=4, seq_len=32)
    return estimate(tiny_model("llama"), baseline_bytes=start, **kw)[0].peak_memory_bytes


def test_memory_held_before_the_trial_is_in_the_max_memory_check(
    monkeypatch, tmp_path, llama_dir, text_jsonl
):
    # A first search imports what the others need (datasets, the tokenizer's code), so the
    # only memory the next two hold beyond their start is what this test gives them.
    rankwise.search(**options(llama_dir, text_jsonl, tmp_path / "warm"))
    trim_heap()
    budget = old_prediction(current_rss()) + BUFFER // 2  # between the old and the new
    fits = rankwise.search(**options(llama_dir, text_jsonl, tmp_path / "fits", max_memory=budget))
    assert [t.status for t in fits.trials] == ["complete"]
    assert fits.trials[0].predicted["peak_memory_bytes"] <= budget

    held = []
    prepare = rankwise.io.data.prepare_data

    def holding(*a, **k):  # the data step keeps a buffer until the trials are over
        held.append(torch.ones(BUFFER // 4))  # written: resident
        return prepare(*a, **k)

    monkeypatch.setattr(rankwise.io.data, "prepare_data", holding)
    over = rankwise.search(**options(llama_dir, text_jsonl, tmp_path / "over", max_memory=budget))
    (trial,) = over.trials
    assert held and trial.status == "skipped" and "--max-memory" in trial.reason, trial.reason
    assert trial.predicted["peak_memory_bytes"] > budget
    assert (
        trial.predicted["baseline_bytes"]
        >= fits.trials[0].predicted["baseline_bytes"] + BUFFER // 2
    )


class Workers:
    """An executor whose workers report their memory, as RayExecutor's do."""

    reported: int | None = None

    def resident_bytes(self, device: str) -> int | None:
        return self.reported


@pytest.fixture
def runner(tmp_path, llama_dir, text_jsonl):
    study = Study(Options.from_flat(options(llama_dir, text_jsonl, tmp_path / "run")))
    study.run()
    return study.session.runner


def test_on_ray_the_prediction_uses_the_workers_memory_not_the_drivers(runner):
    weights = estimate(runner.ctx.model, ranks=[1], baseline_bytes=0)[0].weights_bytes
    workers = Workers()
    runner.resident = workers.resident_bytes
    first = runner.predict(1)  # no worker has reported: the driver's baseline
    assert first["baseline_bytes"] == runner.baseline_bytes
    workers.reported = runner.baseline_bytes + 100 * MiB + weights  # a worker holds more
    later = runner.predict(1)
    assert later["baseline_bytes"] == runner.baseline_bytes + 100 * MiB
    assert later["peak_memory_bytes"] - first["peak_memory_bytes"] == 100 * MiB
    workers.reported = weights  # below the floor: never under the Study's baseline
    assert runner.predict(1)["baseline_bytes"] == runner.baseline_bytes


def test_on_cuda_the_baseline_is_device_memory_beside_the_weights(monkeypatch, runner):
    """The GPU's peak (max_memory_allocated) holds no CPU RSS: the baseline is what is
    allocated on the device beyond the weights, from 0, not from the Study's RSS."""
    import rankwise.training.resources as resources

    weights = estimate(runner.ctx.model, ranks=[1], baseline_bytes=0)[0].weights_bytes
    runner.ctx.device = "cuda:0"  # measured by the patched call below: no GPU is used
    seen = []

    def allocated(device):
        seen.append(device)
        return weights + 5 * MiB

    monkeypatch.setattr(resources, "resident_bytes", allocated)
    assert runner.predict(1)["baseline_bytes"] == 5 * MiB and seen == ["cuda:0"]
    monkeypatch.setattr(resources, "resident_bytes", lambda device: weights // 2)
    assert runner.predict(1)["baseline_bytes"] == 0


def test_a_worker_reports_its_memory_and_the_pool_keeps_the_largest(monkeypatch, runner):
    spec = runner.spec_for(1, 0).replace(adapter_dir=None)
    out = Worker(threads=1).run(spec.to_json())  # a worker's method, in this process
    resident = out["info"]["resident_bytes"]
    assert 0 < resident <= current_rss() + 64 * MiB

    class Ray(types.SimpleNamespace):  # just what RayPool calls
        exceptions = types.SimpleNamespace(RayTaskError=KeyError, RayError=LookupError)
        util = types.SimpleNamespace(list_named_actors=lambda all_namespaces: [])

        def remote(self, cls):
            return cls

        def wait(self, refs, num_returns):
            return [refs[0]], refs[1:]

        def get(self, ref):
            return self.outs[ref]

    ray = Ray(outs={"a": out, "b": {**out, "info": {**out["info"], "resident_bytes": 7}}})
    monkeypatch.setitem(sys.modules, "ray", ray)
    pool = RayPool(2, {"cpu": 1.0}, "test")
    executor = types.SimpleNamespace(pool=pool)
    assert RayExecutor.resident_bytes(executor, "cpu") is None  # before any result
    for ref, worker in (("a", "w0"), ("b", "w1")):
        pool.running[ref] = (spec.key, worker, spec)
        arrival = pool.wait()
    assert pool.resident == {"w0": resident, "w1": 7}
    assert RayExecutor.resident_bytes(executor, "cpu") == resident
    # Where it ran and what it held are kept with the trial's record.
    extra = annotated(arrival.results[0], _Job(spec, {}, False), arrival).extra
    assert extra["resident_bytes"] == 7 and extra["worker"] == "w1"


def test_freed_heap_is_returned_before_a_span_is_measured():
    # 64 KiB blocks live on the heap (under glibc's mmap threshold); a small block kept
    # between each leaves their pages as holes that only malloc_trim hands back.
    blocks, pins = [], []
    for i in range(3072):
        blocks.append(bytes([i % 256]) * (64 * 1024))
        pins.append(bytes([i % 256]) * 1024)
    del blocks
    before = current_rss()
    assert trim_heap()  # glibc (Linux): the machines this runs on
    assert live_rss() < before - 100 * MiB
    with PeakMemory("cpu") as peak:
        pass
    assert peak.bytes < before - 100 * MiB
    assert pins
