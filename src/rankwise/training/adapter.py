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

    _check_init(spec)
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

    torch.manual_seed(spec.train.seed)  # --seed moves the init too (seed i of a run: --seed + i)
    with without_bitsandbytes():  # PEFT's dispatch would import it for nothing
        return get_peft_model(model, lora_config(spec))


# -- attach and detach, leaving the base exactly as it was -----------------------------------
# init_lora_weights values PEFT applies without touching the base weights (peft 0.21,
# tuners/lora/layer.py update_layer): the usual B = 0, random, Gaussian, EVA (B = 0, A set
# later from activations), orthogonal and MiCA (B from the base's SVD, A = 0).
PURE_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# Inits that rewrite the base (W - scaling·B·A, or a quantised W) and need input a LoraSpec
# does not carry: LoftQ a loftq_config, CorDA and LoRA-GA a pass over data beforehand
# (preprocess_corda, preprocess_loraga; without it LoRA-GA silently falls back to Gaussian).
REFUSED_INITS = ("loftq", "corda", "lora_ga")
ACCEPTED_INITS = (
    "True, False, 'gaussian', 'eva', 'orthogonal', 'mica', 'pissa', 'pissa_niter_<n>', 'olora'"
)


def _check_init(spec: TrialSpec) -> None:
    init = spec.lora.init_lora_weights
    if isinstance(init, str) and init in REFUSED_INITS:
        raise ConfigError(
            f"init_lora_weights={init!r}: not supported (it needs a config or a pass over data "
            f"rankwise does not run); accepted: {ACCEPTED_INITS}"
        )


def _rewrites_base(spec: TrialSpec) -> bool:
    """PiSSA (``pissa``, ``pissa_niter_<n>``) and OLoRA subtract their initial B·A from the
    wrapped base weights; so may any init not known to leave them alone."""
    init = spec.lora.init_lora_weights
    return not (isinstance(init, bool) or init in PURE_INITS)


@contextmanager
def attached(model: torch.nn.Module, spec: TrialSpec) -> Iterator:
    """A fresh PEFT adapter on ``model`` (seeded init) for the duration of the block.

    On exit, whatever happened inside (or inside ``get_peft_model``), ``model`` is as it was:
    its modules, parameter objects, ``requires_grad`` flags, train/eval modes and gradients
    (:func:`_kept`), the values of every base parameter the adapter made trainable (biases
    under ``bias="all"|"lora_only"``), and the base weights an init rewrote (PiSSA, OLoRA).
    """
    from peft import get_peft_model

    from rankwise.io.quantize import without_bitsandbytes

    config = lora_config(spec)
    with _kept(model) as params:
        rewritten = _wrapped_weights(model, config) if _rewrites_base(spec) else []
        trained: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        try:
            torch.manual_seed(
                spec.train.seed
            )  # --seed moves the init too (seed i of a run: --seed + i)
            # PEFT's dispatch would import bitsandbytes for nothing on a plain base; a stray
            # pattern key is an error below, named once (PEFT would also warn).
            with warnings.catch_warnings(), without_bitsandbytes():
                warnings.filterwarnings("ignore", message="The following .*_pattern keys did not")
                peft_model = get_peft_model(model, config)
            _verify_patterns(peft_model, spec)
            trained = [(p, p.detach().clone()) for p in params if p.requires_grad]
            yield peft_model
        finally:
            with torch.no_grad():
                # The copies taken before injection last: they hold the values the caller had.
                for p, value in trained + rewritten:
                    p.copy_(value)


@contextmanager
def _kept(model: torch.nn.Module) -> Iterator[list[torch.nn.Parameter]]:
    """Within the block ``model`` may be wrapped and trained; on exit it has back its modules
    and parameter objects at their places, ``requires_grad`` flags, train/eval modes (a
    trial's ``train()`` would leave dropout on for the caller) and gradients, and holds no
    PEFT config. Parameter values are the caller's to restore. Yields the base parameters."""
    modules = dict(model.named_modules())
    seats = [(m, name, p) for m in modules.values() for name, p in m._parameters.items()]
    modes = [(m, m.training) for m in modules.values()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    # The caller's gradients are set aside, not cloned: the trial's backward passes then
    # start from None instead of accumulating into them.
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        yield params
    finally:
        _put_back(model, modules)
        for m, name, p in seats:
            m._parameters[name] = p  # an init may seat a new parameter (OLoRA on 4/8-bit)
        for m, training in modes:
            m.training = training
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad
        if hasattr(model, "peft_config"):
            del model.peft_config


def _wrapped_weights(
    model: torch.nn.Module, config
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """CPU copies of the weights of the modules PEFT will wrap under ``config``.

    A dry run of PEFT's own injection names them (a no-op init and adapter weights on the
    meta device: nothing is computed or allocated for the adapter), so the copies cover what
    an init may rewrite and nothing else: the targeted weights once, on the CPU so that a
    GPU trial's peak memory is the trial's. Quantised weights are not copied: the init that
    accepts them (OLoRA) seats a new parameter, and :func:`_kept` puts the original back.
    """
    import copy

    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from rankwise.io.quantize import without_bitsandbytes

    dry = copy.deepcopy(config)
    dry.init_lora_weights = False
    with _kept(model), warnings.catch_warnings(), without_bitsandbytes():
        warnings.simplefilter("ignore")  # PEFT's warnings come again in the real injection
        peft_model = get_peft_model(model, dry, low_cpu_mem_usage=True)
        bases = [m.get_base_layer() for m in peft_model.modules() if isinstance(m, LoraLayer)]
    return [
        (p, p.detach().to("cpu", copy=True))
        for base in bases
        for p in base.parameters(recurse=False)
        if type(p) is torch.nn.Parameter and p.is_floating_point()
    ]


def _verify_patterns(peft_model, spec: TrialSpec) -> None:
    """A rank/alpha pattern key that matched nothing is a user error, not a trial failure:
    PEFT only warns (peft#3582), so read back what it built (rankwise.training.patterns)."""
    if spec.lora.rank_pattern or spec.lora.alpha_pattern:
        from rankwise.training.patterns import verify_ranks

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
