"""Attaching a fresh PEFT adapter to the loaded base model, and putting the base back."""

from __future__ import annotations

import gc
import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from rankwise.errors import ConfigError
from rankwise.records import TrialSpec

_PROCESS_CACHE: dict = {}


@dataclass
class TrialContext:
    """What a trial needs beyond its spec: the loaded base model and the token blocks."""

    model: torch.nn.Module
    tokenizer: object
    device: str
    data: object  # rankwise.io.data.TokenData

    @classmethod
    def for_spec(cls, spec: TrialSpec) -> TrialContext:
        """Load (once per process) the model and cached tokens a spec names."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        from rankwise.config import ModelConfig
        from rankwise.io.data import TokenData
        from rankwise.io.models import load_model

        key = (repr(sorted(spec.model.items())), spec.data_dir)
        cache = _PROCESS_CACHE.get(key)
        if cache is None:
            path = f"{spec.data_dir}/tokens.safetensors"
            with safe_open(path, "pt") as f:
                info = json.loads((f.metadata() or {}).get("info") or "{}")
            model, tokenizer, device = load_model(ModelConfig(**spec.model), info.get("labels"))
            t = load_file(path)
            data = TokenData(t["train_ids"], t["train_labels"], t["val_ids"], t["val_labels"], info)
            cache = _PROCESS_CACHE[key] = cls(model, tokenizer, device, data)
            gc.freeze()  # the model's objects are permanent: keep them out of every collection
        return cache


def lora_config(spec: TrialSpec):
    """The spec's ``LoraConfig``. For a classifier, PEFT's SEQ_CLS task type puts the head
    (``classifier``/``score``) in ``modules_to_save``: trained beside the adapter, saved with it."""
    from peft import LoraConfig

    return LoraConfig(task_type=task_type(spec.model.get("task")), **spec.lora.kwargs())


def task_type(task: str | None) -> str:
    """PEFT's task type for ``--task``."""
    return "SEQ_CLS" if task == "seq-cls" else "CAUSAL_LM"


def _is_seq_cls(spec: TrialSpec) -> bool:
    return spec.model.get("task") == "seq-cls"


def attach_adapter(model: torch.nn.Module, spec: TrialSpec):
    """A fresh PEFT adapter on ``model`` (seeded init), left attached: for inspection and
    tests. Trials use :func:`attached`, which also takes it off again."""
    from peft import get_peft_model

    from rankwise.io.quantize import without_bitsandbytes

    torch.manual_seed(spec.seed)
    with without_bitsandbytes():  # PEFT's dispatch would import it for nothing
        return get_peft_model(model, lora_config(spec))


# -- attach and detach, leaving the base exactly as it was -----------------------------------
@contextmanager
def attached(model: torch.nn.Module, spec: TrialSpec) -> Iterator:
    """A fresh PEFT adapter on ``model`` (seeded init) for the duration of the block.

    On exit, whatever happened inside (or inside ``get_peft_model``): every module PEFT
    replaced is put back, every base parameter the adapter made trainable gets its
    values and its ``requires_grad`` back, and ``model`` holds no PEFT state.
    """
    from peft import get_peft_model

    from rankwise.io.quantize import without_bitsandbytes

    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    grad_flags = {name: p.requires_grad for name, p in params.items()}
    snapshot: dict[str, torch.Tensor] = {}
    torch.manual_seed(spec.seed)
    try:
        # PEFT's dispatch would import bitsandbytes for nothing on a plain base; a stray
        # pattern key is an error below, named once (PEFT would also warn).
        with warnings.catch_warnings(), without_bitsandbytes():
            warnings.filterwarnings("ignore", message="The following .*_pattern keys did not")
            peft_model = get_peft_model(model, lora_config(spec))
        _verify_patterns(peft_model, spec)
        snapshot = {name: p.detach().clone() for name, p in params.items() if p.requires_grad}
        yield peft_model
    finally:
        _put_back(model, modules)
        with torch.no_grad():
            for name, value in snapshot.items():
                params[name].copy_(value)
        for name, p in params.items():
            p.requires_grad_(grad_flags[name])
        if hasattr(model, "peft_config"):
            del model.peft_config


def _verify_patterns(peft_model, spec: TrialSpec) -> None:
    """A rank/alpha pattern key that matched nothing is a user error, not a trial failure:
    PEFT only warns (peft#3582), so read back what it built (rankwise.analysis.patterns)."""
    if spec.lora.rank_pattern or spec.lora.alpha_pattern:
        from rankwise.analysis.patterns import verify_ranks

        verify_ranks(peft_model, peft_model.peft_config["default"])


def _warm_start(peft_model, folder: str) -> None:
    """Start from a saved adapter's weights (a PEFT folder of the same rank and targets):
    e.g. the final trial of a nested search starts from the nested run's truncation."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise ConfigError(f"init adapter {folder}: no adapter_model.safetensors there")
    state = load_file(str(path))
    result = set_peft_model_state_dict(peft_model, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ConfigError(
            f"init adapter {folder}: does not match the trial's adapter "
            f"(unexpected {list(result.unexpected_keys)[:3]}, missing {missing[:3]})"
        )


def _put_back(model: torch.nn.Module, modules: dict[str, torch.nn.Module]) -> None:
    """Re-seat every recorded module at its path (undoes PEFT's wrappers and LoRA layers)."""
    for path, module in modules.items():
        if not path:
            continue
        parent_path, _, name = path.rpartition(".")
        parent = modules[parent_path] if parent_path else model
        if parent._modules.get(name) is not module:
            parent._modules[name] = module
