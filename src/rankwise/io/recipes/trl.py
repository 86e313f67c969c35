"""A TRL ``SFTConfig`` (``trl sft --config config.yaml``, where one file holds the
``ScriptArguments``, ``SFTConfig`` and ``ModelConfig`` keys) or a transformers
``TrainingArguments`` saved as YAML or JSON, as rankwise options.

Key names and defaults as ``trl/trainer/sft_config.py``, ``trl/trainer/model_config.py``,
``trl/scripts/utils.py`` (``ScriptArguments``) and ``transformers.TrainingArguments``
declare them. TRL reads the data's format from its columns (``messages``,
``prompt``/``completion``, or ``dataset_text_field``), as rankwise's ``--format auto`` does.
"""

from __future__ import annotations

from rankwise.errors import ConfigError
from rankwise.io.recipes.common import TRAINER_KEYS, Keys, data_source, lora_targets

__all__ = ["KEYS", "read"]

KEYS = {
    "model_name_or_path": "--model",
    "dataset_name": "--train (a hub id or a local file)",
    "datasets": "--train (one entry: path, split, data_files)",
    "dataset_train_split": "--split (default train)",
    "dataset_config": "refused unless absent: the search reads a dataset's default config",
    "dataset_text_field": "--text-field (default text)",
    "max_length": "--seq-len (default 1024; max_seq_length in older TRL)",
    **TRAINER_KEYS,
    "learning_rate": "--lr (default 2e-5)",
    "use_peft": "warned if false: the search trains LoRA adapters",
    "lora_r": "replaced by the answer",
    "lora_alpha": "--alpha (default 32)",
    "lora_dropout": "--dropout (default 0.05)",
    "lora_target_modules": "--target-modules",
    "lora_target_parameters": "--target-parameters (e.g. mlp.experts.gate_up_proj: MoE experts)",
    "use_rslora": "--alpha-policy rslora",
    "load_in_4bit": "--quantize 4bit",
    "load_in_8bit": "--quantize 8bit",
    "packing": "warned unless true: rankwise packs examples into blocks",
    "completion_only_loss": "warned if false: rankwise trains on the completion only",
    "assistant_only_loss": "warned unless true: rankwise trains on assistant turns only",
    "chat_template_path": "warned: chats use the tokenizer's template",
    "use_dora": "--use-dora",
    "lora_modules_to_save": "warned: not trained by the search",
    "neftune_noise_alpha": "--neftune-alpha",
    "deepspeed": "warned: trials run on one device",
    "fsdp": "warned: trials run on one device",
    "optim": "warned unless an AdamW: trials use torch AdamW",
    "trust_remote_code": "not passed on: give --trust-remote-code",
}


def read(keys: Keys) -> None:
    """Fill ``keys.options`` and ``keys.warnings`` from a TRL / TrainingArguments config."""
    if "model_name_or_path" in keys:
        keys.options["model"] = str(keys.get("model_name_or_path"))
    _data(keys)
    seq = "max_length" if "max_length" in keys else "max_seq_length"
    keys.set("seq_len", seq, 1024, integer=True)
    keys.set("batch_size", "per_device_train_batch_size", 8, integer=True)
    keys.set("grad_accum", "gradient_accumulation_steps", 1, integer=True)
    keys.set("lr", "learning_rate", 2e-5)
    keys.set("seed", "seed", 42, integer=True)
    keys.set("weight_decay", "weight_decay")
    keys.set("max_grad_norm", "max_grad_norm")
    keys.budget("num_train_epochs", "max_steps", 3.0)
    keys.warmup()
    keys.scheduler("lr_scheduler_type", "linear")
    keys.neftune("neftune_noise_alpha")
    _lora(keys)
    _unhonoured(keys)


def _lora(keys: Keys) -> None:
    keys.warn_if(
        "use_peft",
        "the recipe fine-tunes fully; the search trains LoRA adapters",
        unless=(None, True),
    )
    keys.options["alpha"] = keys.number("lora_alpha", 32)
    keys.set("dropout", "lora_dropout", 0.05)
    if keys.get("use_rslora"):
        keys.options["alpha_policy"] = "rslora"
    keys.dora("use_dora")
    targets = lora_targets(keys.get("lora_target_modules"), keys, "lora_target_modules")
    if targets is not None:
        keys.options["target_modules"] = targets
    keys.target_parameters("lora_target_parameters")
    bits = 4 if keys.get("load_in_4bit") else 8 if keys.get("load_in_8bit") else None
    keys.quantize(bits, "load_in_4bit")


def _unhonoured(keys: Keys) -> None:
    keys.warn_unpacked(keys.get("packing"), "packing", "max_length")
    keys.warn_if(
        "completion_only_loss", "rankwise trains on the completion only", unless=(None, True)
    )
    if not keys.get("assistant_only_loss") and keys.options.get("format") != "text":
        keys.warnings.append(
            "trl assistant_only_loss false: on conversational data TRL trains on every token; "
            "rankwise on the assistant turns only"
        )
    keys.warn_if("chat_template_path", "rankwise renders chats with the tokenizer's own template")
    keys.warn_beyond_a_trial(
        modules_to_save="lora_modules_to_save", distributed=("deepspeed", "fsdp"),
        optimizer="optim",
    )  # fmt: skip


def _data(keys: Keys) -> None:
    if "dataset_config" in keys:
        raise keys.error(
            "dataset_config", "none (the search reads a dataset's default configuration)"
        )
    entries = keys.get("datasets")
    if entries:
        if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
            raise keys.error("datasets", "one {path, split} entry (the search trains on one)")
        entry = entries[0]
        path = entry.get("data_files") or entry.get("path")
        if isinstance(path, list) and len(path) == 1:
            path = path[0]
        keys.options["train"] = data_source(keys, path, "datasets[0].path")
        keys.options["split"] = entry.get("split") or "train"
    elif "dataset_name" in keys:
        keys.options["train"] = data_source(keys, keys.get("dataset_name"), "dataset_name")
        keys.options["split"] = keys.get("dataset_train_split", "train")
    if "dataset_text_field" in keys:
        keys.options["text_field"] = str(keys.get("dataset_text_field"))
    if keys.get("dataset_kwargs", {}).get("skip_prepare_dataset"):
        raise ConfigError(
            f"--from {keys.path}: dataset_kwargs.skip_prepare_dataset: the data is "
            "pre-tokenised by the user's code; the search needs records"
        )
