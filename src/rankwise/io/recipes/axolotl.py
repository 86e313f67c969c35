"""An axolotl config (``axolotl train config.yml``) as rankwise options.

Key names and defaults as axolotl's config schema declares them
(``axolotl/utils/schemas/{config,peft,datasets,training}.py``). :data:`KEYS` says what
rankwise does with each key it reads; the README's axolotl table lists the same.
"""

from __future__ import annotations

from rankwise.errors import ConfigError
from rankwise.io.recipes.common import Keys, data_source, lora_targets

__all__ = ["KEYS", "read", "dataset"]

KEYS = {
    "base_model": "--model",
    "datasets": "--train (one entry: path, type, split, field mappings)",
    "test_datasets": "--val (one local file)",
    "val_set_size": "--val-fraction (a share in (0, 1); 0 or a count: rankwise's 0.1)",
    "sequence_len": "--seq-len (default 512)",
    "micro_batch_size": "--batch-size (default 1)",
    "gradient_accumulation_steps": "--grad-accum (default 1)",
    "learning_rate": "--lr (absent: calibrated)",
    "lr_scheduler": "--lr-scheduler (default cosine); one_cycle and rex are warned about",
    "lr_scheduler_kwargs": "--lr-scheduler-kwargs",
    "cosine_min_lr_ratio": "with lr_scheduler cosine: --lr-scheduler cosine_with_min_lr "
    "--min-lr-ratio (axolotl's cosine to a floor)",
    "cosine_constant_lr_ratio": "warned: trials decay to the floor without a constant phase",
    "lr_quadratic_warmup": "warned: trials warm up linearly",
    "warmup_steps": "--warmup-steps",
    "warmup_ratio": "--warmup-ratio",
    "num_epochs": "--epochs (default 1)",
    "max_steps": "--max-steps (overrides num_epochs)",
    "seed": "--seed (default 42)",
    "weight_decay": "--weight-decay",
    "max_grad_norm": "--max-grad-norm",
    "adapter": "lora or qlora; qlora loads the base in 4 bits",
    "load_in_4bit": "--quantize 4bit",
    "load_in_8bit": "--quantize 8bit",
    "lora_r": "replaced by the answer",
    "lora_alpha": "--alpha (fixed: the same for every rank)",
    "peft_use_rslora": "--alpha-policy rslora",
    "lora_dropout": "--dropout",
    "lora_target_modules": "--target-modules",
    "lora_target_parameters": "--target-parameters (e.g. mlp.experts.gate_up_proj: MoE experts)",
    "lora_target_linear": "--target-modules all-linear",
    "chat_template": "warned unless tokenizer_default: chats use the tokenizer's template",
    "sample_packing": "warned unless true: rankwise packs examples into blocks",
    "train_on_inputs": "warned if true: rankwise trains on the response only",
    "peft_use_dora": "--use-dora",
    "lora_modules_to_save": "warned: not trained by the search",
    "neftune_noise_alpha": "--neftune-alpha",
    "deepspeed": "warned: trials run on one device",
    "fsdp": "warned: trials run on one device",
    "optimizer": "warned unless an AdamW: trials use torch AdamW",
    "trust_remote_code": "not passed on: give --trust-remote-code",
}


def read(keys: Keys) -> None:
    """Fill ``keys.options`` and ``keys.warnings`` from an axolotl config."""
    if "base_model" in keys:
        keys.options["model"] = str(keys.get("base_model"))
    _data(keys)
    keys.set("seq_len", "sequence_len", 512, integer=True)
    keys.set("batch_size", "micro_batch_size", 1, integer=True)
    keys.set("grad_accum", "gradient_accumulation_steps", 1, integer=True)
    keys.set("lr", "learning_rate")
    keys.set("seed", "seed", 42, integer=True)
    keys.set("weight_decay", "weight_decay")
    keys.set("max_grad_norm", "max_grad_norm")
    keys.budget("num_epochs", "max_steps", 1)
    keys.warmup()
    _schedule(keys)
    keys.neftune("neftune_noise_alpha")
    _lora(keys)
    _unhonoured(keys)


def _lora(keys: Keys) -> None:
    adapter = keys.get("adapter")
    if adapter not in (None, "lora", "qlora"):
        raise keys.error("adapter", "lora or qlora (the search trains LoRA adapters)")
    bits = 4 if adapter == "qlora" or keys.get("load_in_4bit") else None
    bits = 8 if keys.get("load_in_8bit") and bits is None else bits
    keys.quantize(bits, "adapter" if adapter == "qlora" else "load_in_4bit")
    if "lora_alpha" in keys:
        keys.options["alpha"] = keys.number("lora_alpha")
    if keys.get("peft_use_rslora"):
        keys.options["alpha_policy"] = "rslora"
    keys.dora("peft_use_dora")
    keys.set("dropout", "lora_dropout")
    targets = lora_targets(keys.get("lora_target_modules"), keys, "lora_target_modules")
    if keys.get("lora_target_linear"):
        targets = "all-linear"  # axolotl adds every linear layer to the names given
    if targets is not None:
        keys.options["target_modules"] = targets
    keys.target_parameters("lora_target_parameters")


def _schedule(keys: Keys) -> None:
    """axolotl's schedule: transformers' types, and its own cosine to a floor (cosine with
    cosine_min_lr_ratio: transformers' cosine_with_min_lr, the same rate at every step)."""
    keys.scheduler("lr_scheduler", "cosine")
    if keys.options.get("lr_scheduler") != "cosine":
        return  # axolotl reads the keys below with its cosine only
    keys.warn_if("lr_quadratic_warmup", "trials warm up linearly")
    ratio = keys.number("cosine_min_lr_ratio")
    if ratio:
        if not 0 <= ratio <= 1:
            raise keys.error("cosine_min_lr_ratio", "a share of the peak rate in [0, 1]")
        keys.options.update(lr_scheduler="cosine_with_min_lr", min_lr_ratio=ratio)
        keys.warn_if(
            "cosine_constant_lr_ratio", "trials decay to the floor without a constant phase"
        )


def _unhonoured(keys: Keys) -> None:
    template = keys.get("chat_template")
    if template not in (None, "tokenizer_default"):
        keys.warn(
            "chat_template",
            "rankwise renders conversations with the tokenizer's own chat template",
        )
    keys.warn_unpacked(keys.get("sample_packing"), "sample_packing", "sequence_len")
    keys.warn_if("train_on_inputs", "rankwise trains on the response only")
    keys.warn_beyond_a_trial(
        modules_to_save="lora_modules_to_save", distributed=("deepspeed", "fsdp"),
        optimizer="optimizer",
    )  # fmt: skip


def _data(keys: Keys) -> None:
    datasets = keys.get("datasets")
    if datasets is None:
        return
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict):
        raise keys.error("datasets", "a list of {path, type} entries")
    if len(datasets) > 1:
        raise keys.error(
            "datasets", "one dataset (the search trains on one; join them into one file)"
        )
    keys.options.update(dataset(keys, datasets[0], "datasets[0]"))
    tests = keys.get("test_datasets")
    if tests:
        if not isinstance(tests, list) or len(tests) != 1 or not isinstance(tests[0], dict):
            raise keys.error("test_datasets", "one {path, type} entry")
        keys.options["val"] = dataset(keys, tests[0], "test_datasets[0]")["train"]
    size = keys.number("val_set_size")
    if size is not None and 0 < size < 1:
        keys.options["val_fraction"] = size
    elif size:
        keys.warn("val_set_size", "a count of records; rankwise holds out a share (0.1)")


def dataset(keys: Keys, entry: dict, where: str) -> dict:
    """One ``datasets:`` entry as --train, --split, --format and the field flags."""
    path = entry.get("data_files") or entry.get("path")
    if isinstance(path, list) and len(path) == 1:
        path = path[0]
    out = {
        "train": data_source(keys, path, f"{where}.path"),
        "split": entry.get("split") or "train",
    }
    kind = entry.get("type")
    if kind is None:
        raise ConfigError(
            f"--from {keys.path}: {where}.type: missing; expected alpaca, sharegpt, chat_template or completion"
        )
    if kind == "alpaca":
        return {**out, "format": "alpaca"}
    if kind == "sharegpt":
        return {
            **out,
            "format": "sharegpt",
            "conversations_field": entry.get("field_messages") or "conversations",
        }
    if kind == "completion":
        return {**out, "format": "text", "text_field": entry.get("field") or "text"}
    if kind == "chat_template":
        return {**out, **_chat(keys, entry, where)}
    raise ConfigError(
        f"--from {keys.path}: {where}.type: {kind!r} is not a format the search reads; "
        "expected alpaca, sharegpt, chat_template or completion"
    )


def _chat(keys: Keys, entry: dict, where: str) -> dict:
    """chat_template turns as role/content (rankwise's messages) or from/value (sharegpt)."""
    field_ = entry.get("field_messages") or "messages"
    mapping = entry.get("message_property_mappings") or {}
    role = mapping.get("role") or entry.get("message_field_role") or "role"
    content = mapping.get("content") or entry.get("message_field_content") or "content"
    if (role, content) == ("role", "content"):
        return {"format": "messages", "messages_field": field_}
    if (role, content) == ("from", "value"):
        return {"format": "sharegpt", "conversations_field": field_}
    raise ConfigError(
        f"--from {keys.path}: {where}.message_property_mappings: turns of {role}/{content}; "
        "the search reads role/content or from/value"
    )
