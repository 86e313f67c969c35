"""Model sources: local directories, hub ids offline, GGUF (the embedded SmolLM2 file)."""

from __future__ import annotations

import pytest

from rankwise.config import ModelConfig
from rankwise.errors import ConfigError
from rankwise.io.models import check_targets, load_model, resolve_source


def test_local_directory_loads_frozen(llama_dir):
    model, tokenizer, device = load_model(ModelConfig(model=str(llama_dir)))
    assert device == "cpu" and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token is not None


def test_targets_default_and_all_linear(gpt2_dir):
    model, _, _ = load_model(ModelConfig(model=str(gpt2_dir)))
    assert {n.rsplit(".", 1)[-1] for n in check_targets(model, None, [4])} == {"c_attn"}
    names = check_targets(model, ["all-linear"], [4])
    assert "lm_head" not in names and any(n.endswith("mlp.c_fc") for n in names)


def test_gguf_path_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="GGUF file .* does not exist"):
        resolve_source(str(tmp_path / "x.gguf"))


@pytest.mark.slow
def test_embedded_smollm2_gguf_loads_dequantised_and_searches(tmp_path, capsys, monkeypatch):
    """The real SmolLM2-135M GGUF: dequantised, cached as safetensors, trainable, searched.

    Converted in a child process, the dequantised copies (~0.8 GiB) never enter this one:
    what loading adds here is the model's weights and the tokenizer."""
    import json

    from rankwise.cli import main
    from rankwise.training.resources import live_rss

    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path / "cache"))  # converted in this test
    before = live_rss()
    model, tokenizer, _ = load_model(ModelConfig(model="smollm2"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    added = live_rss() - before
    assert added < weights + 300 * 2**20, (added / 2**20, weights / 2**20)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    assert tokenizer.chat_template
    data = tmp_path / "t.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i}"}) for i in range(60))
    )
    out = tmp_path / "run"
    argv = [
        "search",
        "--model",
        "smollm2",
        "--train",
        str(data),
        "--out",
        str(out),
        "--ranks",
        "1,2",
        "--start-rank",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--eval-every",
        "2",
        "--lr",
        "1e-3",
        "--max-seeds",  # one seed per rank: each trial of a 135M model costs seconds
        "1",
        "--no-retain",  # forgetting on this model: tests/test_bench_forgetting.py
        "--quiet",
    ]
    assert main(argv) == 0
    rec = json.loads((out / "recommendation.json").read_text())
    assert rec["rank"] in (1, 2) and rec["lora_config"]["target_modules"] == ["q_proj", "v_proj"]


def test_a_damaged_gguf_is_refused_in_one_line_from_the_converting_process(tmp_path):
    """The conversion runs in a child process; its error reaches the user as one line."""
    bad = tmp_path / "damaged.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match=r"^--model: cannot read GGUF file .*damaged\.gguf") as e:
        load_model(ModelConfig(model=str(bad)))
    assert "\n" not in str(e.value)
