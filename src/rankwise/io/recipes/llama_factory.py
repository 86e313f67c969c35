"""A LLaMA-Factory config (``llamafactory-cli train config.yaml``) and its
``dataset_info.json`` as rankwise options.

Key names and defaults as LLaMA-Factory's ``hparams/{model,data,finetuning}_args.py`` and
transformers' ``Seq2SeqTrainingArguments`` declare them; dataset entries as
``data/README.md`` describes them (``file_name`` or ``hf_hub_url``, ``formatting``
alpaca or sharegpt, ``columns``, ``tags``).
"""

from __future__ import annotations

from rankwise.errors import ConfigError
from rankwise.io.readers import read_json_object
from rankwise.io.recipes.common import TRAINER_KEYS, Keys, data_source, lora_targets

__all__ = ["KEYS", "read"]

KEYS = {
    "model_name_or_path": "--model",
    "stage": "sft (or pt: plain text); others refused",
    "finetuning_type": "lora; freeze or full are warned about",
    "dataset": "--train: one name from dataset_info.json",
    "dataset_dir": "where dataset_info.json and the files are (default data)",
    "eval_dataset": "--val: one name from dataset_info.json",
    "val_size": "--val-fraction (a share in (0, 1))",
    "max_samples": "--max-examples",
    "template": "warned: records render with the Alpaca prompt or the tokenizer's template",
    "cutoff_len": "--seq-len (default 2048)",
    **TRAINER_KEYS,
    "learning_rate": "--lr (default 5e-5)",
    "lora_rank": "replaced by the answer",
    "lora_alpha": "--alpha; absent: --alpha-policy ratio 2 (lora_alpha = 2 x rank)",
    "lora_dropout": "--dropout (default 0)",
    "lora_target": "--target-modules (default all: all-linear)",
    "use_rslora": "--alpha-policy rslora",
    "quantization_bit": "--quantize 4bit or 8bit",
    "packing": "warned unless true: rankwise packs examples into blocks",
    "train_on_prompt": "warned if true: rankwise trains on the response only",
    "use_dora": "--use-dora",
    "additional_target": "warned: not trained by the search",
    "loraplus_lr_ratio": "warned: one learning rate for A and B",
    "pissa_init": "warned: trials start from PEFT's default init",
    "neftune_noise_alpha": "--neftune-alpha",
    "deepspeed": "warned: trials run on one device",
    "optim": "warned unless an AdamW: trials use torch AdamW",
    "trust_remote_code": "not passed on: give --trust-remote-code",
}

ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                 "assistant_tag": "gpt", "system_tag": "system"}  # fmt: skip
MESSAGES_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                 "assistant_tag": "assistant", "system_tag": "system"}  # fmt: skip


def read(keys: Keys) -> None:
    """Fill ``keys.options`` and ``keys.warnings`` from a LLaMA-Factory config."""
    stage = keys.get("stage", "sft")
    if stage not in ("sft", "pt"):
        raise keys.error("stage", "sft or pt (the search trains a language-model loss)")
    if "model_name_or_path" in keys:
        keys.options["model"] = str(keys.get("model_name_or_path"))
    _data(keys, stage)
    keys.set("seq_len", "cutoff_len", 2048, integer=True)
    keys.set("batch_size", "per_device_train_batch_size", 8, integer=True)
    keys.set("grad_accum", "gradient_accumulation_steps", 1, integer=True)
    keys.set("lr", "learning_rate", 5e-5)
    keys.set("seed", "seed", 42, integer=True)
    keys.set("weight_decay", "weight_decay")
    keys.set("max_grad_norm", "max_grad_norm")
    keys.set("max_examples", "max_samples", integer=True)
    keys.budget("num_train_epochs", "max_steps", 3.0)
    keys.warmup()
    keys.scheduler("lr_scheduler_type", "linear")
    keys.neftune("neftune_noise_alpha")
    _lora(keys)
    _unhonoured(keys, stage)


def _lora(keys: Keys) -> None:
    keys.warn_if("finetuning_type", "the search trains LoRA adapters", unless=(None, "lora"))
    if "lora_alpha" in keys:
        keys.options["alpha"] = keys.number("lora_alpha")
    else:  # LLaMA-Factory's default: lora_alpha = lora_rank * 2
        keys.options.update(alpha_policy="ratio", alpha_ratio=2.0)
    if keys.get("use_rslora"):
        if "lora_alpha" not in keys:
            raise keys.error("use_rslora", "a lora_alpha beside it (rsLoRA scales alpha/sqrt(r))")
        keys.options["alpha_policy"] = "rslora"
    keys.dora("use_dora")
    keys.set("dropout", "lora_dropout")
    keys.options["target_modules"] = lora_targets(
        keys.get("lora_target", "all"), keys, "lora_target"
    )
    bits = keys.number("quantization_bit", integer=True)
    keys.quantize(bits, "quantization_bit")
    method = keys.get("quantization_method", "bnb" if bits else None)
    if method not in (None, "bnb", "bitsandbytes"):
        raise keys.error("quantization_method", "bnb (the search quantizes with bitsandbytes)")


def _unhonoured(keys: Keys, stage: str) -> None:
    if stage == "sft":
        keys.warnings.append(
            f"llama-factory template {keys.get('template', 'default')}: LLaMA-Factory renders "
            "every record through this template; rankwise renders alpaca records with the "
            "Alpaca prompt and conversations with the tokenizer's own chat template"
        )
    packed = keys.get("packing") or keys.get("neat_packing")
    keys.warn_unpacked(packed, "packing", "cutoff_len")
    keys.warn_if("train_on_prompt", "rankwise trains on the response only")
    keys.warn_if("loraplus_lr_ratio", "trials use one learning rate for A and B")
    keys.warn_if("pissa_init", "trials start from PEFT's default initialisation")
    keys.warn_beyond_a_trial(
        modules_to_save="additional_target", distributed=("deepspeed",), optimizer="optim",
    )  # fmt: skip


def _data(keys: Keys, stage: str) -> None:
    if "dataset" not in keys:
        return
    info = _dataset_info(keys)
    keys.options.update(_entry(keys, info, "dataset", stage))
    if "eval_dataset" in keys:
        keys.options["val"] = _entry(keys, info, "eval_dataset", stage)["train"]
    size = keys.number("val_size")
    if size is not None and 0 < size < 1:
        keys.options["val_fraction"] = size
    elif size:
        keys.warn("val_size", "a count of records; rankwise holds out a share (0.1)")


def _dataset_info(keys: Keys) -> tuple:
    """(dataset_info.json as a dict, the directory it is in)."""
    folder = keys.resolve(keys.get("dataset_dir", "data"), "dataset_dir")
    path = folder / "dataset_info.json" if folder is not None else None
    if path is None or not path.is_file():
        raise ConfigError(
            f"--from {keys.path}: dataset_dir: no dataset_info.json in "
            f"{keys.get('dataset_dir', 'data')} (LLaMA-Factory reads dataset names from it)"
        )
    return read_json_object(path, f"--from {keys.path}: dataset_dir"), path


def _entry(keys: Keys, info_at: tuple, key: str, stage: str) -> dict:
    info, at = info_at
    names = [n.strip() for n in str(keys.get(key)).split(",") if n.strip()]
    if len(names) != 1:
        raise keys.error(
            key, "one dataset name (the search trains on one; join them into one file)"
        )
    name = names[0]
    entry = info.get(name)
    if not isinstance(entry, dict):
        raise ConfigError(f"--from {keys.path}: {key}: {name!r} is not in {at}")
    where = f"{at.name} {name}"
    if entry.get("ranking"):
        raise ConfigError(
            f"--from {keys.path}: {where}.ranking: preference data; the search trains sft"
        )
    if entry.get("file_name"):
        source = data_source(keys, str(at.parent / entry["file_name"]), f"{where}.file_name")
    elif entry.get("hf_hub_url"):
        source = entry["hf_hub_url"]
    else:
        raise ConfigError(f"--from {keys.path}: {where}: expected file_name or hf_hub_url")
    out = {"train": source, "split": entry.get("split") or "train"}
    columns = entry.get("columns") or {}
    if stage == "pt":
        return {**out, "format": "text", "text_field": columns.get("prompt", "text")}
    formatting = entry.get("formatting", "alpaca")
    if formatting == "alpaca":
        for column, ours in ALPACA_COLUMNS.items():
            if columns.get(column, ours) != ours:
                raise ConfigError(
                    f"--from {keys.path}: {where}.columns.{column}: {columns[column]!r}; the "
                    f"search reads alpaca records with the field {ours!r}"
                )
        return {**out, "format": "alpaca"}
    if formatting == "sharegpt":
        return {**out, **_sharegpt(keys, entry, where)}
    raise ConfigError(
        f"--from {keys.path}: {where}.formatting: {formatting!r} is not a format the search "
        "reads; expected alpaca or sharegpt"
    )


def _sharegpt(keys: Keys, entry: dict, where: str) -> dict:
    field_ = (entry.get("columns") or {}).get("messages", "conversations")
    tags = entry.get("tags") or {}
    if all(tags.get(k, v) == v for k, v in SHAREGPT_TAGS.items()):
        return {"format": "sharegpt", "conversations_field": field_}
    if all(tags.get(k, SHAREGPT_TAGS[k]) == v for k, v in MESSAGES_TAGS.items()):
        return {"format": "messages", "messages_field": field_}
    raise ConfigError(
        f"--from {keys.path}: {where}.tags: {tags}; the search reads from/value turns of "
        "human/gpt/system or role/content turns of user/assistant/system"
    )
