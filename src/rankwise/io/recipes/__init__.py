"""``--from FILE``: an axolotl, LLaMA-Factory or TRL training config as the search's options.

The tool is told from the keys (:func:`detect_tool`); each tool's reader
(:mod:`.axolotl`, :mod:`.llama_factory`, :mod:`.trl`) maps its keys onto rankwise's flat
options. Flags, ``--config`` keys and keyword arguments override the recipe
(:func:`with_recipe`); where one of them sets the budget (``--max-steps`` or ``--epochs``)
or the warm-up, the recipe's other spelling of it is dropped.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "train.jsonl").write_text('{"instruction": "hi", "output": "hello"}\\n')
    >>> _ = (d / "qlora.yml").write_text(f'''
    ... base_model: NousResearch/Llama-3.2-1B
    ... adapter: qlora
    ... load_in_4bit: true
    ... datasets:
    ...   - path: {d}/train.jsonl
    ...     type: alpaca
    ... sequence_len: 1024
    ... sample_packing: true
    ... micro_batch_size: 2
    ... gradient_accumulation_steps: 4
    ... num_epochs: 2
    ... learning_rate: 0.0002
    ... lr_scheduler: linear
    ... lora_r: 32
    ... lora_alpha: 16
    ... lora_dropout: 0.05
    ... lora_target_linear: true
    ... ''')
    >>> recipe = read_recipe(d / "qlora.yml")
    >>> recipe.tool, recipe.options["format"], recipe.options["quantize"], recipe.warnings
    ('axolotl', 'alpaca', '4bit', [])
    >>> {k: recipe.options[k] for k in ("seq_len", "batch_size", "grad_accum", "epochs", "lr")}
    {'seq_len': 1024, 'batch_size': 2, 'grad_accum': 4, 'epochs': 2, 'lr': 0.0002}
    >>> merged = with_recipe({"recipe": str(d / "qlora.yml"), "max_steps": 50})
    >>> merged["max_steps"], "epochs" in merged, merged["target_modules"]
    (50, False, 'all-linear')
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rankwise.errors import ConfigError
from rankwise.io.recipes import axolotl, llama_factory, trl
from rankwise.io.recipes.common import Keys, Recipe

__all__ = [
    "RECIPE_TOOLS",
    "Recipe",
    "read_recipe",
    "load_recipe_file",
    "detect_tool",
    "tool_evidence",
    "with_recipe",
]

READERS = {"axolotl": axolotl, "llama-factory": llama_factory, "trl": trl}
RECIPE_TOOLS = tuple(READERS)

# Keys only that tool's config has, checked in this order: a TrainingArguments file (TRL's
# last group) is TRL's only when neither axolotl's nor LLaMA-Factory's own keys are there.
SIGNATURES = {
    "axolotl": {"base_model", "adapter", "lora_target_linear", "sequence_len",
                "micro_batch_size", "num_epochs", "val_set_size", "sample_packing",
                "peft_use_rslora", "lr_scheduler", "test_datasets"},
    "llama-factory": {"stage", "finetuning_type", "dataset", "dataset_dir", "template",
                      "cutoff_len", "lora_rank", "lora_target", "quantization_bit", "val_size"},
    "trl": {"dataset_name", "dataset_text_field", "max_seq_length", "max_length", "packing",
            "use_peft", "completion_only_loss", "assistant_only_loss", "dataset_train_split",
            "per_device_train_batch_size", "num_train_epochs", "lr_scheduler_type",
            "output_dir", "learning_rate", "lora_r", "model_name_or_path"},
}  # fmt: skip


def load_recipe_file(path: str | Path) -> dict:
    """The file's top-level mapping, read as YAML (JSON is YAML too)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--from: file {path} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"--from: {path}: not a YAML or JSON file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--from: {path}: not a YAML or JSON mapping of training keys")
    return data


def tool_evidence(data: dict) -> tuple[str | None, str | None]:
    """(the tool, the first of the file's keys that says so), or (None, None)."""
    for tool, keys in SIGNATURES.items():
        hit = next((k for k in data if k in keys), None)
        if hit is not None:
            return tool, hit
    return None, None


def detect_tool(data: dict, path: str | Path = "") -> str:
    """axolotl, llama-factory or trl, from the keys.

    >>> detect_tool({"base_model": "m", "datasets": [], "micro_batch_size": 2})
    'axolotl'
    >>> detect_tool({"model_name_or_path": "m", "stage": "sft", "dataset": "a", "template": "qwen"})
    'llama-factory'
    >>> detect_tool({"output_dir": "o", "per_device_train_batch_size": 4, "num_train_epochs": 1})
    'trl'
    """
    tool, _ = tool_evidence(data)
    if tool is not None:
        return tool
    shown = ", ".join(list(map(str, data))[:6]) or "none"
    raise ConfigError(
        f"--from: {path}: keys {shown}: not an axolotl, LLaMA-Factory or TRL config "
        "(expected e.g. base_model + datasets, model_name_or_path + dataset + template, or "
        "SFTConfig / TrainingArguments keys)"
    )


def read_recipe(path: str | Path) -> Recipe:
    """The recipe at ``path`` as rankwise options, with its warnings."""
    data = load_recipe_file(path)
    tool = detect_tool(data, path)
    keys = Keys(data, Path(path), tool)
    READERS[tool].read(keys)
    return Recipe(tool, Path(path), keys.options, keys.warnings)


# Option pairs that say one thing two ways: an explicit one drops the recipe's other.
_EITHER = (("max_steps", "epochs"), ("warmup_steps", "warmup_ratio"), ("alpha", "alpha_ratio"))


def with_recipe(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (flags, --config keys or keyword arguments) over the recipe they name.

    Without a ``recipe`` key, ``values`` unchanged. A recipe without a model needs one given.
    """
    path = values.get("recipe")
    if not path:
        return values
    recipe = read_recipe(path)
    base = dict(recipe.options)
    explicit = {k.replace("-", "_") for k in values}
    for a, b in _EITHER:
        if a in explicit:
            base.pop(b, None)
        if b in explicit:
            base.pop(a, None)
    if "alpha" in explicit and base.get("alpha_policy") == "ratio":
        base.pop("alpha_policy")  # LLaMA-Factory's 2 x rank default gives way to a fixed alpha
    if "model" not in base and "model" not in explicit:
        who = {"axolotl": "base_model"}.get(recipe.tool, "model_name_or_path")
        raise ConfigError(f"--from {path}: {who}: missing; give it there or as --model")
    return {**base, **values}
