"""bench/gpu_check.py without a GPU: ``--device cpu --smoke`` runs every part's code on a tiny
task; the option sets, the prediction-against-measurement arithmetic, a failing part, the
table and the packing for a lent machine are checked without training."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from bench.recipe_fidelity import DEMO
from rankwise.records import TrialResult


def test_smoke_on_cpu_runs_every_part_and_renders_from_json(bench_main, tmp_path):
    out = bench_main(gpu_check, "--device", "cpu", "--out", str(tmp_path))
    doc = json.loads((tmp_path / "gpu_check.json").read_text())
    assert gpu_check.render(doc) in out
    assert doc["settings"]["device"] == "cpu" and doc["environment"]["device"].endswith("(cpu)")
    rows = doc["results"]
    assert [r["status"] for r in rows] == ["ok"] * len(rows), rows
    checks = [r["check"] for r in rows]
    assert checks[0] == "demo search" and checks[-1] == "throughput vs Trainer + PEFT"
    assert "4-bit QLoRA trial" in checks and "4-bit QLoRA memory" in checks
    memory = [r for r in rows if r["check"] == "memory"]
    assert [r["setting"].split(",")[0] for r in memory][:2] == ["r=1", "r=2"]
    for r in memory:  # the error is the prediction's, against the measured peak
        assert r["value"] == pytest.approx((r["reference"] - r["measured"]) / r["measured"])
        assert abs(r["value"]) < 0.5
    qlora = next(r for r in rows if r["check"] == "4-bit QLoRA trial")
    assert "4bit base, compute float32" in qlora["setting"]  # as the trial's spec recorded it
    assert qlora["setting"].startswith(f"r={rows[0]['answer']},")  # at the demo's answer


def test_plan_is_the_demo_on_cuda_in_bf16_and_qlora_in_4bit():
    p = gpu_check.plan("cuda")
    assert p.demo == DEMO | {"dtype": "auto", "device": "cuda"}  # auto: bf16 autocast there
    assert p.qlora["quantize"] == "4bit" and p.qlora["dtype"] == "bfloat16"
    assert p.qlora["strategy"] == "grid" and p.qlora["max_seeds"] == 1 and not p.qlora["retain"]
    assert p.throughput["model"] == "smollm2" and p.precisions == ("fp32", "bf16")
    assert gpu_check.plan("cpu").qlora["dtype"] == "float32"
    assert gpu_check.plan("cuda", model="/m.gguf").demo["model"] == "/m.gguf"


def test_demo_options_are_the_makefiles():
    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    text = makefile.split("demo: $(STAMP)", 1)[1].split("$(BIN)/rankwise show", 1)[0]
    words = text.replace("\\\n", " ").split()
    flags = dict(zip(words[2::2], words[3::2], strict=True))
    flags.pop("--out")
    parsed = {k[2:].replace("-", "_"): v for k, v in flags.items()}
    assert set(parsed) == set(DEMO)
    assert {k: type(DEMO[k])(v) for k, v in parsed.items()} == DEMO


def trial(rank, seed, peak, predicted, status="complete"):
    return TrialResult(key=f"r{rank}-s{seed}", rank=rank, seed=seed, status=status,
                       best_val_loss=1.0, peak_memory_bytes=peak,
                       predicted={"peak_memory_bytes": predicted})  # fmt: skip


def test_memory_rows_compare_each_ranks_first_trial_and_the_whole_search():
    trials = [trial(4, 0, 100, 110), trial(4, 1, 200, 110), trial(8, 0, 120, 108),
              trial(16, 0, None, 130), trial(32, 0, 50, 60, status="failed")]  # fmt: skip
    rows = gpu_check.memory_rows(trials, process_peak=150, device="cuda:0")
    assert [(r["setting"].split(",")[0], r["value"]) for r in rows[:2]] == [
        ("r=4", pytest.approx(0.1)), ("r=8", pytest.approx(-0.1))]  # fmt: skip
    assert "max_memory_allocated" in rows[0]["setting"]
    assert rows[2]["setting"].startswith("whole search") and rows[2]["value"] == pytest.approx(
        (110 - 150) / 150
    )
    assert "peak RSS" in gpu_check.memory_rows(trials, None, "cpu")[0]["setting"]
    assert gpu_check.prediction_error(90, 100) == pytest.approx(-0.1)


def test_a_failing_part_is_a_row_and_the_rest_still_run(monkeypatch, tmp_path):
    def boom(p, runs):
        raise RuntimeError("CUDA error: out of memory\nmore")

    asked = {}
    monkeypatch.setattr(gpu_check, "run_demo", boom)
    monkeypatch.setattr(gpu_check, "run_qlora", lambda p, runs, demo: asked.setdefault("q", [
        gpu_check.row("4-bit QLoRA trial", f"demo {demo}", 1.0, None, "nats")]))  # fmt: skip
    monkeypatch.setattr(gpu_check, "run_throughput", lambda p, runs: [])
    rows = gpu_check.run_parts(gpu_check.plan("cuda"), tmp_path, log=lambda *a, **k: None)
    assert rows[0]["status"] == "failed: RuntimeError: CUDA error: out of memory"
    assert rows[1]["setting"] == "demo None"  # the 4-bit trial then takes its fallback rank


def test_render_needs_only_the_json():
    row = gpu_check.row
    doc = {"environment": {"device": "NVIDIA H100 (cuda)", "torch": "2.11"}, "results": [
        row("demo search", "cuda: float32 weights, bfloat16 autocast", 3.25, None, "nats",
            seconds=61.2),
        row("memory", "r=8", 2 * 2**30, 2.2 * 2**30, "bytes", compare="error"),
        row("4-bit QLoRA trial", "r=8", 3.3, 3.25, "nats", compare="difference"),
        row("throughput vs Trainer + PEFT", "bf16", 9000.0, 10000.0, "tok/s", compare="ratio"),
        gpu_check.failed("qlora", ValueError("no bitsandbytes")),
    ]}  # fmt: skip
    table = gpu_check.render(json.loads(json.dumps(doc)))
    assert (
        "| demo search | cuda: float32 weights, bfloat16 autocast | 3.2500 | - | - | ok | 61 s |"
        in table
    )
    assert "| memory | r=8 | 2,048 MiB | 2,253 MiB | +10.0% | ok | - |" in table
    assert "| 3.3000 | 3.2500 | +0.0500 |" in table
    assert "| 9,000 tok/s | 10,000 tok/s | 0.900x |" in table
    assert "| qlora | - | - | - | - | failed: ValueError: no bitsandbytes | - |" in table
    assert "Device: NVIDIA H100 (cuda) (torch 2.11," in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_asked_where_there_is_none_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--device", "cuda"])
    assert exit_.value.code == 2 and "--device cpu --smoke" in capsys.readouterr().err


def test_split_file_and_the_packed_libraries(tmp_path):
    src = tmp_path / "f.bin"
    src.write_bytes(bytes(range(256)) * 10)
    gpu_check.split_file(src, tmp_path / "a", tmp_path / "b", 1000)
    assert (tmp_path / "a").stat().st_size == 1000
    assert (tmp_path / "a").read_bytes() + (tmp_path / "b").read_bytes() == src.read_bytes()
    keep = lambda name: gpu_check._cuda13_only(tarfile.TarInfo(name)) is not None  # noqa: E731
    assert keep("bitsandbytes/libbitsandbytes_cuda130.so") and keep("bitsandbytes/nn/modules.py")
    assert keep("bitsandbytes/libbitsandbytes_cpu.so")
    assert not keep("bitsandbytes/libbitsandbytes_cuda124.so")
    assert not keep("bitsandbytes/__pycache__/x.pyc")
