"""Quantized bases (QLoRA): load the frozen base in 4 or 8 bits, train LoRA on top.

``--quantize 4bit`` loads the base through transformers' ``BitsAndBytesConfig`` as the
QLoRA paper does (Dettmers et al. 2023, arXiv 2305.14314): NF4 weights, double
quantisation of the block scales, matmuls in the compute dtype (``--dtype``). ``8bit`` is
LLM.int8 (arXiv 2208.07339). The model then goes once through PEFT's
``prepare_model_for_kbit_training``, which freezes everything and casts the
non-quantized fp16/bf16 parameters (norms, embeddings, the head) to fp32; every trial
starts from that prepared base, and the one trial lifecycle restores it after each trial.

Two things here keep that base fixed and the terminal quiet:

- bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a ``Linear4bit`` weight in place
  at its first no-grad forward (an evaluation), rounding the block scales to bf16: the
  base would change under the first trial's evaluation, and later trials would train
  through another kernel (the same trial run twice gave different losses). :func:`prepare`
  switches that repacking off.
- bitsandbytes logs at import (``Failed to load CPU gemm_4bit_forward from
  kernels-community ...``, an optional ``kernels`` package it falls back from). transformers
  (5.x) does not import it on its own; PEFT does whenever it is installed: eagerly in
  ``peft/helpers.py``, and in ``get_peft_model`` (its LoRA dispatch imports
  ``lora/bnb.py``). Where a command first needs PEFT it imports it through
  :func:`import_peft`, which keeps bitsandbytes out of peft's first import, and the trial
  lifecycle attaches adapters :func:`without_bitsandbytes`, so no command imports it unless
  a quantized base is asked for (:func:`require_bitsandbytes`). Importing rankwise itself
  imports neither, and installs no import hook.

Bytes per weight (what ``estimate`` counts), for a linear layer of ``n = in x out``
weights: NF4 keeps ``n / 2`` bytes plus one scale per block of 64 weights (fp32, or with
double quantisation one byte, and an fp32 scale and offset per 256 of those) and its
16-entry lookup table; LLM.int8 keeps ``n`` bytes plus an fp32 scale per output row.

Example (arithmetic only; nothing is imported):
    >>> linear_weight_bytes(64, 64, "4bit") == 4096 // 2 + 64 + 4 + 4 + 16 * 4
    True
    >>> linear_weight_bytes(64, 64, "8bit") == 4096 + 64 * 4
    True
"""

from __future__ import annotations

import importlib.util
import logging
import math
import sys
from contextlib import contextmanager

from rankwise.errors import ConfigError

__all__ = [
    "QUANTIZE_CHOICES",
    "INSTALL_HINT",
    "import_peft",
    "without_bitsandbytes",
    "require_bitsandbytes",
    "bnb_config_kwargs",
    "bnb_config",
    "prepare",
    "is_quantized",
    "linear_weight_bytes",
]

QUANTIZE_CHOICES = ("none", "4bit", "8bit")
INSTALL_HINT = "pip install rankwise[quantize]"

NF4_BLOCK = 64  # weights per absmax scale (bitsandbytes' default blocksize for 4-bit)
NESTED_BLOCK = 256  # scales per second-level scale under double quantisation
NF4_CODE = 16  # entries of the NF4 lookup table (fp32)


# -- keeping bitsandbytes out until it is asked for ------------------------------------------
@contextmanager
def without_bitsandbytes():
    """Inside the block bitsandbytes cannot be imported and PEFT believes it absent; after
    it, both are as before. A no-op once bitsandbytes is imported (a quantized base).

    PEFT imports bitsandbytes whenever it is installed: in ``peft/helpers.py`` at import,
    and through ``lora/bnb.py`` each time ``get_peft_model`` dispatches layers. Its
    ``is_bnb_available()`` is cached (``lru_cache``), so the cache is cleared on the way in
    (to see the block) and on the way out (so that nothing outlives it).
    """
    if "bitsandbytes" in sys.modules:  # imported (or held back by an outer block): leave it
        yield
        return
    sys.modules["bitsandbytes"] = None  # the import system's "not importable" marker
    _forget_peft_checks()
    try:
        yield
    finally:
        if sys.modules.get("bitsandbytes", 0) is None:
            del sys.modules["bitsandbytes"]
        _forget_peft_checks()


def _forget_peft_checks() -> None:
    utils = sys.modules.get("peft.import_utils")
    for name in ("is_bnb_available", "is_bnb_4bit_available"):
        check = getattr(utils, name, None)
        if hasattr(check, "cache_clear"):
            check.cache_clear()


def import_peft():
    """``peft``, imported without bitsandbytes unless that is already imported (a quantized
    base); once peft is imported, a no-op. Called where a command first needs PEFT (the
    study, loading a model, estimate, export), not at ``import rankwise``: importing the
    package changes nothing in the import system.

    transformers only looks peft up (``find_spec``); peft's own first import is what would
    import bitsandbytes (``peft/helpers.py``), so that import runs held back.
    """
    if "peft" not in sys.modules:
        with without_bitsandbytes():
            import peft  # noqa: F401
    return sys.modules["peft"]


def require_bitsandbytes(quantize: str):
    """Import bitsandbytes for a quantized base, quietly; ConfigError if it is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"--quantize {quantize}: needs bitsandbytes ({INSTALL_HINT})")
    # Its import-time notice about the optional `kernels` package, and LLM.int8's notice on
    # every fp32 matmul, are expected fallbacks, not news: keep warnings below ERROR quiet.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import bitsandbytes

    helpers = sys.modules.get("peft.helpers")
    if helpers is not None and getattr(helpers, "bnb", None) is None:
        helpers.bnb = bitsandbytes  # what peft would have found had it been importable then
    return bitsandbytes


# -- loading and preparing ---------------------------------------------------------------
def bnb_config_kwargs(quantize: str, compute_dtype: str) -> dict:
    """``BitsAndBytesConfig`` keywords for ``--quantize`` (plain data: it goes in
    recommendation.json). ``compute_dtype`` names a torch dtype, e.g. ``"bfloat16"``."""
    if quantize == "4bit":
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",  # QLoRA's NormalFloat4
            "bnb_4bit_use_double_quant": True,  # quantize the block scales too (~0.37 bit/weight saved)
            "bnb_4bit_compute_dtype": compute_dtype,
        }
    if quantize == "8bit":
        return {"load_in_8bit": True}
    raise ValueError(f"quantize: expected 4bit or 8bit, got {quantize!r}")


def bnb_config(quantize: str, compute_dtype):
    """The ``BitsAndBytesConfig`` a quantized base is loaded with (imports bitsandbytes)."""
    require_bitsandbytes(quantize)
    from transformers import BitsAndBytesConfig

    name = str(compute_dtype).rsplit(".", 1)[-1]
    return BitsAndBytesConfig(**bnb_config_kwargs(quantize, name))


def prepare(model):
    """PEFT's ``prepare_model_for_kbit_training``, once per loaded base, and no in-place
    repacking of 4-bit weights (see the module docstring).

    Gradient checkpointing stays off (``use_gradient_checkpointing=False``): it would make
    quantized trials run another recipe than unquantized ones, and the memory estimate of
    every rank assumes it is off.
    """
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def is_quantized(model) -> bool:
    return bool(
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    )


# -- bytes -------------------------------------------------------------------------------
def linear_weight_bytes(fan_in: int, fan_out: int, quantize: str, double_quant: bool = True) -> int:
    """Bytes a quantized linear layer's weight takes in memory, its quantisation state included."""
    n = fan_in * fan_out
    if quantize == "8bit":
        return n + 4 * fan_out  # int8 weight + one fp32 scale (SCB) per output row
    if quantize != "4bit":
        raise ValueError(f"quantize: expected 4bit or 8bit, got {quantize!r}")
    blocks = math.ceil(n / NF4_BLOCK)
    if not double_quant:
        return math.ceil(n / 2) + 4 * blocks + 4 * NF4_CODE
    # uint8 scales, an fp32 scale per 256 of them, one fp32 offset. The 256-entry table the
    # scales are quantized with is one tensor shared by every layer (1 KiB): not counted.
    nested = math.ceil(blocks / NESTED_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * nested + 4 + 4 * NF4_CODE
