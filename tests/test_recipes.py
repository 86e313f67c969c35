"""``--from`` recipes and ``--merge-into``: an axolotl alpaca QLoRA recipe, a LLaMA-Factory
sharegpt recipe with its ``dataset_info.json`` and a TRL ``SFTConfig`` YAML with a chat
dataset, each in its tool's documented shape, read, searched through the CLI on a tiny
model, and merged back: the LoRA keys hold the answer, every other key and every comment is
as the user wrote it. Then the key mapping per tool, and every bad input as one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from rankwise.cli import main
from rankwise.io.recipes import RECIPE_TOOLS, read_recipe, with_recipe
from rankwise.io.recipes import axolotl as axolotl_keys
from rankwise.io.recipes import llama_factory as llama_factory_keys
from rankwise.io.recipes import trl as trl_keys

from .conftest import check_error, sentences

FAST = ["--ranks", "1,2", "--start-rank", "1", "--max-seeds", "1", "--quiet",
        "--dtype", "float32", "--eval-every", "3"]  # fmt: skip

AXOLOTL = """\
# QLoRA on instruction data, as axolotl's examples/llama-3/qlora.yml lays it out
base_model: {model}  # a local checkpoint
model_type: AutoModelForCausalLM
tokenizer_type: AutoTokenizer

load_in_8bit: false
load_in_4bit: true
adapter: qlora

datasets:
  - path: {data}
    type: alpaca
dataset_prepared_path: last_run_prepared
val_set_size: 0.1
output_dir: ./outputs/qlora-out

sequence_len: 64
sample_packing: true
pad_to_sequence_len: true

# LoRA: the rank is what rankwise searches
lora_r: 32  # to be searched
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true

wandb_project:
gradient_accumulation_steps: 1
micro_batch_size: 4
max_steps: 6
optimizer: adamw_torch
lr_scheduler: linear
learning_rate: 0.003
bf16: auto
warmup_steps: 0
seed: 7
special_tokens:
  pad_token: "<pad>"
"""

LLAMA_FACTORY = """\
### model
model_name_or_path: {model}
trust_remote_code: false

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8  # to be searched
lora_alpha: 16
lora_target: q_proj,v_proj

### dataset
dataset: chat_demo
dataset_dir: {dataset_dir}
template: llama3
cutoff_len: 64
overwrite_cache: true
preprocessing_num_workers: 1

### output
output_dir: saves/lora/sft
logging_steps: 10
plot_loss: true

### train
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
learning_rate: 3.0e-3
num_train_epochs: 1.0
lr_scheduler_type: linear
warmup_ratio: 0.0
bf16: true

### eval
val_size: 0.1
per_device_eval_batch_size: 4
eval_strategy: steps
eval_steps: 500
"""

TRL = """\
# trl sft --config sft.yaml: ScriptArguments, SFTConfig and ModelConfig in one file
model_name_or_path: {model}
dataset_name: {data}
dataset_train_split: train

# SFTConfig
output_dir: sft-lora
max_length: 64
packing: true
assistant_only_loss: true
per_device_train_batch_size: 4
gradient_accumulation_steps: 1
learning_rate: 3.0e-3
lr_scheduler_type: linear
num_train_epochs: 1
max_steps: 6
logging_steps: 5
seed: 3

# ModelConfig (PEFT)
use_peft: true
lora_r: 16  # to be searched
lora_alpha: 16
lora_dropout: 0.0
lora_target_modules:
  - q_proj
  - v_proj
"""


def alpaca_file(path: Path) -> Path:
    rows = [{"instruction": f"Repeat: {s}", "input": "", "output": s} for s in sentences(48)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def sharegpt_file(path: Path) -> Path:  # LLaMA-Factory's data files are JSON lists
    rows = [
        {"conversations": [{"from": "human", "value": s}, {"from": "gpt", "value": s[:12]}]}
        for s in sentences(48)
    ]
    path.write_text(json.dumps(rows))
    return path


def chat_file(path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": s}, {"role": "assistant", "content": s[:12]}]}
        for s in sentences(48)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def recipes(tmp_path, llama_dir):
    """The three recipes, written in their tools' documented shapes."""
    data = tmp_path / "data"
    data.mkdir()
    sharegpt_file(data / "chat_demo.json")
    info = {"chat_demo": {"file_name": "chat_demo.json", "formatting": "sharegpt",
                          "columns": {"messages": "conversations"}}}  # fmt: skip
    (data / "dataset_info.json").write_text(json.dumps(info, indent=2))
    files = {
        "axolotl": AXOLOTL.format(model=llama_dir, data=alpaca_file(tmp_path / "alpaca.jsonl")),
        "llama-factory": LLAMA_FACTORY.format(model=llama_dir, dataset_dir=data),
        "trl": TRL.format(model=llama_dir, data=chat_file(tmp_path / "chat.jsonl")),
    }
    out = {}
    for tool, text in files.items():
        out[tool] = tmp_path / f"{tool}.yaml"
        out[tool].write_text(text)
    return out


def comments(text: str) -> list[str]:
    """Every comment of a YAML text, in order (a '#' outside quotes, to the line's end)."""
    return [m.group(0).strip() for m in re.finditer(r"#[^\n]*", text)]


# The tool's own names for the LoRA keys the merge sets (and so may change).
LORA_KEYS = {
    "axolotl": {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                "lora_target_linear", "peft_use_rslora", "peft_use_dora"},
    "llama-factory": {"lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora",
                      "use_dora"},
    "trl": {"use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
            "use_rslora", "use_dora"},
}  # fmt: skip
RANK_KEY = {"axolotl": "lora_r", "llama-factory": "lora_rank", "trl": "lora_r"}


@pytest.mark.parametrize("tool", RECIPE_TOOLS)
def test_recipe_searched_and_merged_back(tool, recipes, tmp_path, capsys):
    recipe, run = recipes[tool], tmp_path / "run"
    extra = ["--trial-budget", "0.5"] if tool == "llama-factory" else []
    assert main(["search", "--from", str(recipe), "--out", str(run), *FAST, *extra]) == 0
    rec = json.loads((run / "recommendation.json").read_text())
    expected = {"axolotl": "alpaca", "llama-factory": "sharegpt", "trl": "messages"}[tool]
    assert {t["rank"] for t in rec["trials"]} == {1, 2}  # --ranks, a flag, over the recipe
    assert rec["lora_config"]["lora_alpha"] == 16 and rec["alpha_policy"] == "fixed"
    targets = {"axolotl": "all-linear"}.get(tool, ["q_proj", "v_proj"])
    assert rec["lora_config"]["target_modules"] in (targets, sorted(targets))
    assert _data_format(run) == expected
    assert rec["recipe"] == {"path": str(recipe), "tool": tool}
    if tool == "axolotl":  # the recipe's QLoRA and budget are the search's
        assert rec["quantize"] == "4bit" and rec["budget"]["max_steps"] == 6
    if tool == "llama-factory":  # 1 epoch of the packed data, half of it per trial
        budget = rec["budget"]
        assert budget["epochs"] == 1.0 and budget["trial_budget"] == 0.5
        assert budget["max_steps"] == -(-budget["full_steps"] // 2) > 1
        assert budget["holds_for"].endswith(
            f"0.5 of the recipe's 1 epochs ({budget['full_steps']} steps)"
        )
    out = tmp_path / f"merged-{tool}.yaml"
    capsys.readouterr()
    assert (
        main(["export", str(run), "--to", tool, "--merge-into", str(recipe), "--output", str(out)])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(out)
    before, after = yaml.safe_load(recipe.read_text()), yaml.safe_load(out.read_text())
    assert after[RANK_KEY[tool]] == rec["rank"]
    assert after["lora_alpha"] == 16 and [k for k in after if k in before] == list(before)
    for key, value in before.items():  # untouched keys: identical, in the same order
        if key not in LORA_KEYS[tool]:
            assert after[key] == value, key
    old, new = comments(recipe.read_text()), comments(out.read_text())
    assert [c for c in new if c in old] == old  # every comment kept, in order
    assert any(c.startswith(f"# rankwise (run run): r={rec['rank']}") for c in new)


def _data_format(run: Path) -> str:
    import sqlite3

    with sqlite3.connect(run / "trials.sqlite") as db:
        rows = dict(db.execute("select key, value from meta"))
    return json.loads(rows["data"])["format"]


def test_merged_trl_json_keeps_key_order(tmp_path, capsys):
    """A TrainingArguments JSON (no comments): keys set in place, the notes on stderr."""
    from .test_export import fabricate_run

    fabricate_run(
        tmp_path / "run", {"rank_pattern": {"q": 8}}, None, budget={"holds_for": "9 steps"}
    )
    args = {"output_dir": "o", "per_device_train_batch_size": 4, "lora_r": 32, "use_peft": True,
            "learning_rate": 1e-4, "num_train_epochs": 3}  # fmt: skip
    (tmp_path / "args.json").write_text(json.dumps(args))
    assert main(["export", str(tmp_path / "run"), "--to", "trl", "--merge-into",
                 str(tmp_path / "args.json"), "--in-place"]) == 0  # fmt: skip
    merged = json.loads((tmp_path / "args.json").read_text())
    assert list(merged)[:6] == list(args) and merged["lora_r"] == 4
    assert merged["lora_target_modules"] == ["q_proj", "v_proj"] and merged["lora_dropout"] == 0.05
    err = capsys.readouterr().err
    assert "not applied: rank_pattern" in err and "9 steps" in err


# -- the key mapping ---------------------------------------------------------------------
def test_axolotl_keys(recipes, llama_dir):
    r = read_recipe(recipes["axolotl"])
    assert r.tool == "axolotl" and r.warnings == []
    o = r.options
    assert (o["model"], o["format"], o["quantize"], o["seq_len"]) == (
        str(llama_dir),
        "alpaca",
        "4bit",
        64,
    )
    assert (o["batch_size"], o["grad_accum"], o["max_steps"], o["lr"], o["seed"]) == (
        4,
        1,
        6,
        0.003,
        7,
    )
    assert (o["alpha"], o["dropout"], o["target_modules"], o["val_fraction"]) == (
        16,
        0.05,
        "all-linear",
        0.1,
    )
    assert "alpha_policy" not in o and "epochs" not in o


def test_llama_factory_keys(recipes):
    r = read_recipe(recipes["llama-factory"])
    o = r.options
    assert r.tool == "llama-factory" and o["format"] == "sharegpt"
    assert o["conversations_field"] == "conversations" and o["train"].endswith("chat_demo.json")
    assert (o["epochs"], o["warmup_steps"], o["target_modules"]) == (1.0, 0, ["q_proj", "v_proj"])
    assert [w.split(":")[0] for w in r.warnings] == [
        "llama-factory template llama3",
        "llama-factory packing false",
    ]


def test_trl_keys_and_its_defaults(recipes, tmp_path):
    o = read_recipe(recipes["trl"]).options
    assert (o["max_steps"], o["seq_len"], o["seed"], o["alpha"], o["split"]) == (
        6,
        64,
        3,
        16,
        "train",
    )
    bare = tmp_path / "args.json"  # a TrainingArguments JSON: TRL's and HF's defaults apply
    bare.write_text(json.dumps({"output_dir": "o", "num_train_epochs": 2}))
    r = read_recipe(bare)
    assert r.tool == "trl"
    assert {k: r.options[k] for k in ("epochs", "lr", "batch_size", "seq_len", "alpha", "dropout")} == {
        "epochs": 2, "lr": 2e-5, "batch_size": 8, "seq_len": 1024, "alpha": 32, "dropout": 0.05}  # fmt: skip


def test_unhonoured_keys_are_each_named_once(tmp_path, llama_dir):
    """Keys the trials honour now (cosine, NEFTune) are not warned about; those they cannot
    (axolotl's quadratic warm-up and rex schedule, packing, several devices) once each."""
    text = AXOLOTL.format(model=llama_dir, data=alpaca_file(tmp_path / "a.jsonl"))
    text = text.replace("sample_packing: true", "sample_packing: false")
    text += (
        "neftune_noise_alpha: 5\ndeepspeed: deepspeed_configs/zero2.json\nlr_scheduler: cosine\n"
        "lr_quadratic_warmup: true\n"
    )
    (tmp_path / "r.yml").write_text(text.replace("lr_scheduler: linear\n", ""))
    warned = [w.split(":")[0] for w in read_recipe(tmp_path / "r.yml").warnings]
    assert warned == ["axolotl lr_quadratic_warmup True", "axolotl sample_packing false",
                      "axolotl deepspeed deepspeed_configs/zero2.json"]  # fmt: skip
    (tmp_path / "rex.yml").write_text(text.replace("lr_scheduler: cosine", "lr_scheduler: rex"))
    rex = read_recipe(tmp_path / "rex.yml")
    assert "lr_scheduler" not in rex.options
    assert [w for w in rex.warnings if w.startswith("axolotl lr_scheduler rex: not a ")]


def test_flags_override_the_recipe(recipes):
    merged = with_recipe({"recipe": str(recipes["llama-factory"]), "max_steps": 3, "alpha": 8})
    assert merged["max_steps"] == 3 and "epochs" not in merged and merged["alpha"] == 8
    merged = with_recipe({"recipe": str(recipes["axolotl"]), "epochs": 2, "quantize": "none"})
    assert merged["epochs"] == 2 and "max_steps" not in merged and merged["quantize"] == "none"
    no_alpha = recipes["llama-factory"].with_name("no-alpha.yaml")
    no_alpha.write_text(recipes["llama-factory"].read_text().replace("lora_alpha: 16\n", ""))
    lf = with_recipe({"recipe": str(no_alpha)})  # LLaMA-Factory's default: alpha = 2 x rank
    assert (lf["alpha_policy"], lf["alpha_ratio"]) == ("ratio", 2.0)
    assert "alpha_policy" not in with_recipe({"recipe": str(no_alpha), "alpha": 8})


@pytest.mark.parametrize(
    "tool, module",
    [("axolotl", axolotl_keys), ("LLaMA-Factory", llama_factory_keys), ("TRL", trl_keys)],
)
def test_readme_has_a_table_row_per_key(tool, module):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split(f"#### {tool} keys")[1].split("####")[0]
    missing = [k for k in module.KEYS if f"| `{k}` |" not in section]
    assert not missing, missing


# -- bad input: one line naming the key, exit 2 -------------------------------------------
def test_bad_recipes(tmp_path, capsys, recipes):
    def search(path):
        return ["search", "--from", str(path), "--out", str(tmp_path / "run")]

    (tmp_path / "notes.txt").write_text("key: [unclosed\n")
    check_error(capsys, search(tmp_path / "notes.txt"), "not a YAML or JSON file")
    (tmp_path / "other.yaml").write_text("epochs_of_fun: 3\nname: x\n")
    check_error(
        capsys,
        search(tmp_path / "other.yaml"),
        "epochs_of_fun",
        "not an axolotl, LLaMA-Factory or TRL config",
    )
    text = recipes["axolotl"].read_text()
    (tmp_path / "io.yaml").write_text(text.replace("type: alpaca", "type: input_output"))
    check_error(
        capsys, search(tmp_path / "io.yaml"), "datasets[0].type: 'input_output' is not a format"
    )
    (tmp_path / "gone.yaml").write_text(re.sub(r"path: .*", "path: ./missing.jsonl", text))
    check_error(
        capsys,
        search(tmp_path / "gone.yaml"),
        "datasets[0].path: dataset path ./missing.jsonl does not exist",
    )
    check_error(
        capsys,
        [*search(recipes["trl"]), "--serve", "vllm:12"],
        "--serve vllm:12: '12' is not a rank vLLM loads",
    )
    from .test_export import fabricate_run

    fabricate_run(tmp_path / "done", {}, None)
    check_error(
        capsys,
        ["export", str(tmp_path / "done"), "--to", "trl", "--merge-into", str(recipes["axolotl"])],
        "base_model is axolotl's key",
        "not TRL's (use --to axolotl)",
    )
