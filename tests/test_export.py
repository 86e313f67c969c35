"""``rankwise export``: a finished run's recommendation in axolotl, LLaMA-Factory and PEFT keys.

A matrix of recommendations (targets as names or all-linear, rsLoRA, per-module patterns,
bias, quantisation) × the three tools, each exported through the CLI, parsed back and
checked key by key; then a real tiny search exported and its PEFT config applied.
"""

from __future__ import annotations

import json

import pytest
import yaml

from rankwise.cli import main
from rankwise.report.export import export_config

from .conftest import check_error, search_argv

# Keys each tool's own schema declares (axolotl: utils/schemas/peft.py and the model
# section; LLaMA-Factory: hparams/finetuning_args.py LoraArguments, model_args.py): an
# exported key outside these would be invented.
AXOLOTL_KEYS = {
    "base_model",
    "adapter",
    "load_in_4bit",
    "load_in_8bit",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "lora_target_linear",
    "peft_use_rslora",
    "peft_use_dora",
    "lora_rank_pattern",
    "lora_alpha_pattern",
}
LLAMA_FACTORY_KEYS = {
    "model_name_or_path",
    "finetuning_type",
    "quantization_bit",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target",
    "use_rslora",
    "use_dora",
}

BASE = {
    "r": 4,
    "lora_alpha": 16.0,
    "target_modules": ["q_proj", "v_proj"],
    "lora_dropout": 0.05,
    "bias": "none",
    "use_rslora": False,
    "task_type": "CAUSAL_LM",
}
CASES = {
    "names": ({}, None),
    "all-linear, rsLoRA, 8-bit": (
        {"target_modules": "all-linear", "use_rslora": True, "r": 16},
        "8bit",
    ),
    "patterns, bias, 4-bit": (
        {
            "rank_pattern": {"model.layers.0.self_attn.q_proj": 8},
            "alpha_pattern": {"model.layers.0.self_attn.q_proj": 32.0},
            "bias": "lora_only",
        },
        "4bit",
    ),
}


def fabricate_run(path, lora_over: dict, quantize: str | None, **rec_over):
    path.mkdir()
    rec = {
        "rank": lora_over.get("r", 4),
        "name": "fabricated",
        "model": "HuggingFaceTB/SmolLM2-135M",
        "reason": "r=4: val loss 3.1234 (best 3.1101 at r=16, within 1%)",
        "lora_config": {**BASE, **lora_over},
        **({"quantize": quantize} if quantize else {}),
        **rec_over,
    }
    (path / "recommendation.json").write_text(json.dumps(rec))
    return rec


def run_export(tmp_path, capsys, tool: str):
    out = tmp_path / f"exported.{'json' if tool == 'peft' else 'yaml'}"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--to", tool, "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    return out.read_text()


def exported_yaml(tmp_path, capsys, case: str, tool: str, allowed: set[str]):
    """(the run's recommendation, its lora_config, the exported YAML text, parsed): only
    keys the tool knows."""
    rec = fabricate_run(tmp_path / "run", *CASES[case])
    text = run_export(tmp_path, capsys, tool)
    cfg = yaml.safe_load(text)
    assert set(cfg) <= allowed, set(cfg) - allowed
    return rec, rec["lora_config"], text, cfg


@pytest.mark.parametrize("case", list(CASES))
def test_axolotl(tmp_path, capsys, case):
    rec, lora, text, cfg = exported_yaml(tmp_path, capsys, case, "axolotl", AXOLOTL_KEYS)
    assert cfg["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert (cfg["lora_r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (lora["r"], 16, 0.05)
    assert isinstance(cfg["lora_alpha"], int)  # axolotl's schema: lora_alpha: int
    assert cfg["peft_use_rslora"] is lora["use_rslora"]
    if lora["target_modules"] == "all-linear":
        assert cfg["lora_target_linear"] is True and "lora_target_modules" not in cfg
    else:
        assert cfg["lora_target_modules"] == ["q_proj", "v_proj"]
    quantize = rec.get("quantize")
    assert cfg["adapter"] == ("qlora" if quantize == "4bit" else "lora")
    assert cfg.get("load_in_4bit") is (True if quantize == "4bit" else None)
    assert cfg.get("load_in_8bit") is (True if quantize == "8bit" else None)
    if "rank_pattern" in lora:
        assert cfg["lora_rank_pattern"] == {"model.layers.0.self_attn.q_proj": 8}
        assert cfg["lora_alpha_pattern"] == {"model.layers.0.self_attn.q_proj": 32}
        assert '# bias "lora_only": axolotl has no bias key' in text and "not applied" in text


@pytest.mark.parametrize("case", list(CASES))
def test_llama_factory(tmp_path, capsys, case):
    rec, lora, text, cfg = exported_yaml(
        tmp_path, capsys, case, "llama-factory", LLAMA_FACTORY_KEYS
    )
    assert cfg["model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"
    assert cfg["finetuning_type"] == "lora"
    assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"]) == (lora["r"], 16, 0.05)
    assert cfg["use_rslora"] is lora["use_rslora"]
    expected_target = "all" if lora["target_modules"] == "all-linear" else "q_proj,v_proj"
    assert cfg["lora_target"] == expected_target
    assert cfg.get("quantization_bit") == {"4bit": 4, "8bit": 8}.get(rec.get("quantize"))
    if "rank_pattern" in lora:  # no per-module keys and no bias key: said, not dropped
        for line in (
            '# rank_pattern {"model.layers.0.self_attn.q_proj": 8}: LLaMA-Factory has no '
            "per-module rank key; not applied",
            '# alpha_pattern {"model.layers.0.self_attn.q_proj": 32.0}: LLaMA-Factory has '
            "no per-module alpha key; not applied",
            '# bias "lora_only": LLaMA-Factory has no LoRA bias key; not applied',
        ):
            assert line in text.splitlines(), text


# TRL's ModelConfig (trl/trainer/model_config.py): the keys `trl sft --config` builds its
# LoraConfig from.
TRL_KEYS = {
    "model_name_or_path",
    "use_peft",
    "load_in_4bit",
    "load_in_8bit",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_rslora",
    "use_dora",
}


@pytest.mark.parametrize("case", list(CASES))
def test_trl(tmp_path, capsys, case):
    rec, lora, text, cfg = exported_yaml(tmp_path, capsys, case, "trl", TRL_KEYS)
    assert cfg["use_peft"] is True and cfg["lora_r"] == lora["r"] and cfg["lora_alpha"] == 16
    assert cfg["lora_target_modules"] == lora["target_modules"]  # a list, or all-linear
    assert cfg.get("load_in_4bit") is (True if rec.get("quantize") == "4bit" else None)
    assert cfg.get("load_in_8bit") is (True if rec.get("quantize") == "8bit" else None)
    if "rank_pattern" in lora:  # ModelConfig has no per-module key: said, not dropped
        assert "TRL has no per-module rank key; not applied" in text


@pytest.mark.parametrize("case", list(CASES))
def test_peft(tmp_path, capsys, case):
    from peft import LoraConfig

    rec = fabricate_run(tmp_path / "run", *CASES[case])
    lora = rec["lora_config"]
    config = LoraConfig(**json.loads(run_export(tmp_path, capsys, "peft")))
    assert (config.r, config.lora_alpha, config.lora_dropout) == (lora["r"], 16.0, 0.05)
    assert config.use_rslora is lora["use_rslora"] and config.bias == lora["bias"]
    targets = lora["target_modules"]
    assert config.target_modules == (targets if isinstance(targets, str) else set(targets))
    assert config.rank_pattern == lora.get("rank_pattern", {})
    assert config.base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M"


def test_peft_says_quantisation_is_not_a_lora_setting(tmp_path, capsys):
    fabricate_run(tmp_path / "run", {}, "4bit")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--to", "peft"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["r"] == 4
    assert "not applied: quantize 4bit" in err and "BitsAndBytesConfig(load_in_4bit=True)" in err


def test_yaml_to_standard_output(tmp_path, capsys):
    fabricate_run(tmp_path / "run", {}, None)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--to", "axolotl"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# LoRA settings recommended by rankwise (run fabricated): r=4")
    assert yaml.safe_load(out)["lora_r"] == 4


def test_embedded_model_and_fractional_alpha(tmp_path):
    fabricate_run(tmp_path / "run", {"lora_alpha": 2.5, "r": 1}, None, model="smollm2")
    text = export_config(tmp_path / "run", "llama-factory")
    cfg = yaml.safe_load(text)
    assert cfg["model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg["lora_alpha"] == 2 and "lora_alpha 2.5: LLaMA-Factory takes an integer" in text


def test_other_lora_settings_become_comments(tmp_path):
    over = {"use_dora": True, "init_lora_weights": "pissa", "fan_in_fan_out": False}
    fabricate_run(tmp_path / "run", over, None)
    text = export_config(tmp_path / "run", "axolotl")
    assert yaml.safe_load(text)["peft_use_dora"] is True
    assert '# init_lora_weights "pissa": axolotl has no key for it; not applied' in text
    assert "fan_in_fan_out" not in text  # PEFT's default: nothing to carry over


def test_bad_input_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    check_error(capsys, ["export", str(tmp_path / "nope"), "--to", "peft"], "no such run")
    check_error(
        capsys, ["export", str(tmp_path / "empty"), "--to", "peft"], "no recommendation.json"
    )
    fabricate_run(tmp_path / "run", {}, None, rank=None, reason="no trial completed")
    check_error(
        capsys,
        ["export", str(tmp_path / "run"), "--to", "axolotl"],
        "recommended no rank (no trial completed); nothing to export",
    )
    with pytest.raises(SystemExit) as exit_:  # argparse's own one-line error
        main(["export", str(tmp_path / "run"), "--to", "unsloth"])
    assert exit_.value.code == 2 and "--to: invalid choice: 'unsloth'" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "recommendation.json").write_text("{oops")
    check_error(capsys, ["export", str(tmp_path / "bad"), "--to", "peft"], "malformed JSON")
    fabricate_run(tmp_path / "ok", {}, None)
    check_error(
        capsys,
        ["export", str(tmp_path / "ok"), "--to", "peft", "--output", str(tmp_path / "x" / "y")],
        "--output: cannot write",
    )


def test_a_real_search_exported_and_applied(tmp_path, llama_dir, text_jsonl, capsys):
    from peft import LoraConfig, get_peft_model

    from rankwise.testing import tiny_model

    run = tmp_path / "run"
    assert main(search_argv(llama_dir, text_jsonl, run, ranks="1,2")) == 0
    rank = json.loads((run / "recommendation.json").read_text())["rank"]
    for tool in ("axolotl", "llama-factory"):
        cfg = yaml.safe_load(export_config(run, tool))
        assert cfg.get("lora_r", cfg.get("lora_rank")) == rank
        assert cfg.get("base_model", cfg.get("model_name_or_path")) == str(llama_dir)
    config = LoraConfig(**json.loads(export_config(run, "peft")))
    model = get_peft_model(tiny_model("llama"), config)
    ranks = {m.r["default"] for m in model.modules() if hasattr(m, "lora_A") and m.r}
    assert ranks == {rank}


@pytest.mark.parametrize("tool", ["axolotl", "llama-factory", "trl"])
def test_the_schedule_dora_and_neftune_are_written_back(tmp_path, capsys, tool):
    """The trials' schedule and NEFTune in the tool's own training keys (axolotl's cosine to
    a floor as cosine + cosine_min_lr_ratio), beside its DoRA key; --merge-into notes a
    file whose schedule differs, and not one that leaves it to the same default."""
    from rankwise.report.merge import merge_into

    budget = {"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
              "neftune_alpha": 5.0, "holds_for": "6 steps, cosine_with_min_lr schedule"}  # fmt: skip
    fabricate_run(tmp_path / "run", {"use_dora": True}, None, budget=budget)
    cfg = yaml.safe_load(run_export(tmp_path, capsys, tool))
    expected = {
        "axolotl": {"lr_scheduler": "cosine", "cosine_min_lr_ratio": 0.1, "peft_use_dora": True},
        "llama-factory": {"lr_scheduler_type": "cosine_with_min_lr", "use_dora": True,
                          "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
        "trl": {"lr_scheduler_type": "cosine_with_min_lr", "use_dora": True,
                "lr_scheduler_kwargs": {"min_lr_rate": 0.1}},
    }[tool]  # fmt: skip
    assert expected.items() <= cfg.items() and cfg["neftune_noise_alpha"] == 5.0
    key = "lr_scheduler" if tool == "axolotl" else "lr_scheduler_type"
    default = tmp_path / "default.yaml"  # the tool's default schedule: linear, or axolotl's cosine
    default.write_text({"axolotl": "base_model: m\n", "llama-factory": "stage: sft\n",
                        "trl": "model_name_or_path: m\n"}[tool])  # fmt: skip
    linear = tmp_path / "linear.yaml"
    linear.write_text(default.read_text() + f"{key}: linear\n")
    notes = {}
    for f in (default, linear):
        text = merge_into(tmp_path / "run", tool, f).path.read_text()
        notes[f.stem] = f"the search used {key}:" in text
        assert yaml.safe_load(text).get(key) == yaml.safe_load(f.read_text()).get(key)  # kept
    assert notes == {"default": tool != "axolotl", "linear": True}
