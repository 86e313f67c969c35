"""QLoRA: a real 4-/8-bit bitsandbytes base on CPU, through the CLI and the lifecycle; what
estimate counts for it; and a terminal free of bitsandbytes unless a quantized base is asked for."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rankwise.cli import main
from rankwise.config import ModelConfig
from rankwise.io.data import TokenData
from rankwise.io.models import load_model
from rankwise.training.adapter import TrialContext
from rankwise.training.lifecycle import run_lifecycle
from rankwise.training.trial import run_trial

from .conftest import make_spec, search_argv
from .test_lifecycle import FailAt, digest, masked_blocks

CHATTER = ("gemm_4bit", "bitsandbytes", "kernels", "matmul8bitlt")


def quantized(llama_dir, bits: str):
    model, _, _ = load_model(ModelConfig(model=str(llama_dir), quantize=bits))
    return model


# The trial these tests repeat: the update on an MLP projection too, one warm-up step.
QLORA = {"target_modules": ["q_proj", "v_proj", "up_proj"], "warmup_steps": 1}


def context(model) -> TrialContext:
    tr, trl = masked_blocks(32, 16, 0)
    va, val = masked_blocks(8, 16, 1)
    return TrialContext(model, None, "cpu", TokenData(tr, trl, va, val, {}))


def test_qlora_search_through_the_cli(tmp_path, llama_dir, text_jsonl, monkeypatch):
    import bitsandbytes as bnb

    import rankwise.io.models

    loaded = {}
    real = rankwise.io.models.load_model

    def keep(cfg, labels=None):
        model, tokenizer, device = real(cfg, labels)
        loaded["model"] = model
        return model, tokenizer, device

    monkeypatch.setattr(rankwise.io.models, "load_model", keep)
    out = tmp_path / "run"
    assert main(search_argv(llama_dir, text_jsonl, out, ranks="1,2", quantize="4bit")) == 0
    q_proj = loaded["model"].model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.dtype.itemsize == 1
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["quantize"] == "4bit" and rec["rank"] in (1, 2)
    assert rec["quantization_config"] == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "float32",
    }
    assert all(t["status"] == "complete" for t in rec["trials"])
    summary = (out / "summary.md").read_text()
    assert "quantized base**: 4bit" in summary
    assert "BitsAndBytesConfig(**" in summary and "prepare_model_for_kbit_training" in summary
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_trials_repeat_and_leave_the_base_alone(llama_dir, bits):
    """The same trial twice scores the same, and the base is bit-identical after a trial and
    after a failed one. On CPUs with AVX512-BF16, bitsandbytes would repack 4-bit weights at
    the first evaluation unless rankwise.io.quantize.prepare switches it off."""
    ctx = context(quantized(llama_dir, bits))
    before = digest(ctx.model)
    first = run_trial(make_spec(2, **QLORA), ctx)
    assert first.ok and digest(ctx.model) == before
    failed = run_lifecycle(make_spec(4, **QLORA), ctx, FailAt(3))[0]
    assert failed.status == "failed" and digest(ctx.model) == before
    again = run_trial(make_spec(2, **QLORA), ctx)
    assert again.best_val_loss == first.best_val_loss and again.val_curve == first.val_curve
    assert digest(ctx.model) == before


def test_prepare_casts_norms_to_fp32_and_freezes(llama_dir):
    model, _, _ = load_model(ModelConfig(model=str(llama_dir), quantize="4bit", dtype="bfloat16"))
    norm = model.model.layers[0].input_layernorm.weight
    assert norm.dtype.is_floating_point and norm.dtype.itemsize == 4  # upcast from bf16
    assert not any(p.requires_grad for p in model.parameters())
    assert model.model.layers[0].self_attn.q_proj.compute_dtype.itemsize == 2  # --dtype


def _measured_weight_bytes(model) -> int:
    """Bytes the loaded base holds: parameters plus bitsandbytes' quantisation state."""
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:  # nf4 + double quant: uint8 scales, their scale, an offset
            total += state.absmax.nbytes + state.code.nbytes
            total += state.offset.nbytes + state.state2.absmax.nbytes
        if getattr(p, "SCB", None) is not None:  # LLM.int8: a scale per output row
            total += p.SCB.nbytes
    return total


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_estimate_counts_quantized_weights_exactly(llama_dir, bits):
    from rankwise.analysis.estimate import estimate

    model = quantized(llama_dir, bits)
    measured = _measured_weight_bytes(model)
    from_config = estimate(str(llama_dir), ranks=[2], quantize=bits, baseline_bytes=0)[0]
    from_model = estimate(model, ranks=[2], quantize=bits, baseline_bytes=0)[0]
    plain = estimate(str(llama_dir), ranks=[2], baseline_bytes=0)[0]
    assert from_config.weights_bytes == from_model.weights_bytes == measured
    assert from_config.weights_bytes < plain.weights_bytes
    assert from_model.base_params == plain.base_params  # 4-bit weights counted unpacked
    assert from_model.trainable_params == plain.trainable_params


def test_estimate_command_takes_quantize(llama_dir, capsys):
    assert main(["estimate", "--model", str(llama_dir), "--ranks", "2", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)[0]
    args = ["estimate", "--model", str(llama_dir), "--ranks", "2", "--json", "--quantize", "4bit"]
    assert main(args) == 0
    q4 = json.loads(capsys.readouterr().out)[0]
    assert q4["weights_bytes"] < 0.6 * plain["weights_bytes"]


def test_missing_bitsandbytes_is_one_line_exit_2(
    tmp_path, llama_dir, text_jsonl, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    out = tmp_path / "run"
    assert main(search_argv(llama_dir, text_jsonl, out, quantize="8bit")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--quantize 8bit" in err
    assert "pip install rankwise[quantize]" in err and not (out / "trials.sqlite").exists()


def test_bad_quantize_value_names_the_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--quantize", "3bit"])
    assert exit_.value.code == 2 and "--quantize" in capsys.readouterr().err


def test_no_bitsandbytes_output_unless_a_quantized_base_is_asked_for(
    tmp_path, llama_dir, text_jsonl
):
    """Help, bad input, estimate and an ordinary search, in a fresh process with
    bitsandbytes installed: none prints a word of it, none imports it. (Installed,
    bitsandbytes logs about an optional `kernels` package when imported, and PEFT imports
    it at import and in every get_peft_model.)"""
    import importlib.util

    assert importlib.util.find_spec("bitsandbytes") is not None  # else this proves nothing
    run = search_argv(llama_dir, text_jsonl, tmp_path / "run", ranks="1")
    script = textwrap.dedent(
        f"""
        import importlib.util, sys
        from rankwise.cli import main
        importlib.util.find_spec("peft")  # as transformers does, long before peft is imported
        for argv in (["--help"], {run!r},
                     ["search", "--model", {str(tmp_path / "none")!r}, "--ranks", "1",
                      "--out", {str(tmp_path / "bad")!r}],
                     ["estimate", "--model", {str(llama_dir)!r}, "--ranks", "1,2"]):
            try:
                print("exit", main(argv))
            except SystemExit as e:
                print("exit", e.code)
        print("IMPORTED", "bitsandbytes" in sys.modules)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    text = (done.stdout + done.stderr).replace(str(tmp_path), "TMP")  # the test's own name
    assert done.returncode == 0, text
    assert "IMPORTED False" in text and text.count("exit 0") == 3 and "exit 2" in text
    for word in CHATTER:
        assert word not in text.lower(), text
