"""A finished search's recommendation, in the keys of the tool that trains with it.

``rankwise export DIR --to axolotl|llama-factory|peft`` reads ``DIR/recommendation.json``
(its ``lora_config`` holds PEFT ``LoraConfig`` keyword arguments; ``model`` and, when the
search quantised the base, ``quantize`` sit beside it) and writes:

=========================  ==========================  ============================
recommendation             axolotl                     LLaMA-Factory
=========================  ==========================  ============================
model                      ``base_model``              ``model_name_or_path``
r                          ``lora_r``                  ``lora_rank``
lora_alpha                 ``lora_alpha``              ``lora_alpha``
lora_dropout               ``lora_dropout``            ``lora_dropout``
target_modules (names)     ``lora_target_modules``     ``lora_target: a,b``
target_modules all-linear  ``lora_target_linear``      ``lora_target: all``
use_rslora / use_dora      ``peft_use_rslora/_dora``   ``use_rslora`` / ``use_dora``
target_parameters          ``lora_target_parameters``  (no key)
rank_pattern               ``lora_rank_pattern``       (no key)
alpha_pattern              ``lora_alpha_pattern``      (no key)
bias other than none       (no key)                    (no key)
quantize 4bit / 8bit       ``adapter: qlora`` +        ``quantization_bit: 4`` / ``8``
                           ``load_in_4bit`` / ``lora``
                           + ``load_in_8bit``
lr schedule (budget)       ``lr_scheduler`` (cosine     ``lr_scheduler_type``,
                           + ``cosine_min_lr_ratio``),  ``lr_scheduler_kwargs``
                           ``lr_scheduler_kwargs``
NEFTune alpha (budget)     ``neftune_noise_alpha``      ``neftune_noise_alpha``
=========================  ==========================  ============================

``trl`` writes TRL's ``ModelConfig`` keys as ``trl sft --config`` reads them
(``model_name_or_path``, ``use_peft``, ``lora_r``, ``lora_alpha``, ``lora_dropout``,
``lora_target_modules``, ``lora_target_parameters``, ``use_rslora``, ``use_dora``, ``load_in_4bit``/``8bit``; no
per-module keys), and the schedule and NEFTune as LLaMA-Factory does (both are
``TrainingArguments`` keys). The schedule and NEFTune are how the trials trained, not LoRA
settings: ``--merge-into`` leaves the file's own and says where they differ, as it does
for the model. ``--merge-into FILE`` (:mod:`rankwise.report.merge`) sets these keys in
the user's own config instead, keeping the rest of it. With ``--serve`` the text says the
``--max-lora-rank`` to start vLLM with.

Keys as axolotl's config schema (``axolotl/utils/schemas/peft.py``) and LLaMA-Factory's
``LoraArguments`` and ``ModelArguments`` (``llamafactory/hparams/``) spell them. A setting
the tool has no key for is written as a comment saying it is not applied, never dropped
silently. ``peft`` writes the ``LoraConfig`` keyword arguments as JSON (as in an
``adapter_config.json``): ``LoraConfig(**json.load(f))`` rebuilds it; quantisation is not
a ``LoraConfig`` setting, so it comes back as a note.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> run = Path(tempfile.mkdtemp())
    >>> lora = {"r": 8, "lora_alpha": 16.0, "target_modules": ["q_proj", "v_proj"],
    ...         "lora_dropout": 0.05, "bias": "none", "use_rslora": False,
    ...         "task_type": "CAUSAL_LM"}
    >>> rec = {"rank": 8, "name": "qwen-alpaca", "model": "Qwen/Qwen2.5-0.5B",
    ...        "reason": "r=8: val loss 1.2345", "lora_config": lora}
    >>> _ = (run / "recommendation.json").write_text(json.dumps(rec))
    >>> print(export_config(run, "llama-factory"))
    # LoRA settings recommended by rankwise (run qwen-alpaca): r=8: val loss 1.2345
    # Merge these keys into your LLaMA-Factory training config.
    model_name_or_path: Qwen/Qwen2.5-0.5B
    finetuning_type: lora
    lora_rank: 8
    lora_alpha: 16
    lora_dropout: 0.05
    lora_target: q_proj,v_proj
    use_rslora: false
    <BLANKLINE>
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankwise.config.commands import EXPORT_TOOLS
from rankwise.errors import ConfigError
from rankwise.report.document import read_document
from rankwise.storage.rundir import RunDir

__all__ = ["TOOLS", "Exported", "export", "export_config"]

TOOLS = EXPORT_TOOLS  # declared with --to (rankwise.config.commands)
TOOL_NAMES = {"axolotl": "axolotl", "llama-factory": "LLaMA-Factory", "trl": "TRL", "peft": "PEFT"}
QUANTIZE_BITS = {None: None, "none": None, "4bit": 4, "8bit": 8}
# rankwise's embedded model is the GGUF of this hub model, dequantised
EMBEDDED = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class Exported:
    """A tool's config as text, and the recommended settings it could not express.

    ``keys``: the LoRA keys and their values (what ``--merge-into`` sets in the user's
    file); ``setup``: the other keys (model, adapter, quantization), which it checks;
    ``comments``: the comment lines of ``text`` without their ``#``.
    """

    text: str
    notes: list[str] = field(default_factory=list)
    keys: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)


def export(run_dir: str | Path, tool: str) -> Exported:
    """The recommendation of ``run_dir`` in ``tool``'s keys (see the module doc)."""
    if tool not in TOOLS:
        raise ConfigError(f"--to: expected one of {', '.join(TOOLS)}, got {tool!r}")
    rec = load_recommendation(run_dir)
    write = {"axolotl": _axolotl, "llama-factory": _llama_factory, "trl": _trl, "peft": _peft}
    return write[tool](rec)


def export_config(run_dir: str | Path, tool: str) -> str:
    """The text of ``tool``'s config for the run's recommended adapter."""
    return export(run_dir, tool).text


def load_recommendation(run_dir: str | Path) -> dict:
    """``DIR/recommendation.json``, checked to hold a recommended rank and its LoraConfig."""
    path = RunDir(run_dir).recommendation
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no recommendation.json; a search writes it when it finishes")
    rec = read_document(path, "export").to_dict()  # any version, as the current one
    lora = rec.get("lora_config")
    if rec.get("rank") is None or not isinstance(lora, dict) or "r" not in lora:
        why = f" ({rec['reason']})" if rec.get("reason") else ""
        raise ConfigError(f"{path}: the search recommended no rank{why}; nothing to export")
    if rec.get("quantize") not in QUANTIZE_BITS:
        raise ConfigError(f"{path}: quantize {rec['quantize']!r}; expected 4bit, 8bit or none")
    return rec


# -- YAML with comments ------------------------------------------------------------------------
class _Yaml:
    """Key/value lines in order, with comment lines for what the tool cannot express."""

    def __init__(self, rec: dict, tool: str):
        self.tool, self.lines, self.notes = TOOL_NAMES[tool], [], []
        self.keys, self.setup, self.comments = {}, {}, []
        name = rec.get("name") or "?"
        said = rec.get("headline") or rec.get("reason") or f"r={rec['rank']}"
        reason = " ".join(str(said).split())
        self.comment(f"LoRA settings recommended by rankwise (run {name}): {reason}")
        if holds := (rec.get("budget") or {}).get("holds_for"):
            self.comment(f"The answer holds for a trial budget of {holds}.")
        self.comment(f"Merge these keys into your {self.tool} training config.")
        if serve := rec.get("serve"):
            self.comment(f"Serve it with vLLM: --max-lora-rank {serve['max_lora_rank']}"
                         + (f" ({serve['command']})" if serve.get("command") else ""))  # fmt: skip

    def comment(self, text: str) -> None:
        self.lines += [f"# {line}" for line in text.splitlines()]
        self.comments += text.splitlines()

    def key(self, name: str, value: Any, *, lora: bool = True) -> None:
        import yaml

        (self.keys if lora else self.setup)[name] = value
        self.lines.append(yaml.safe_dump({name: value}, sort_keys=False).rstrip("\n"))

    def unsupported(self, setting: str, value: Any, why: str = "") -> None:
        note = f"{setting} {json.dumps(value)}: {self.tool} has no {why or 'key for it'}"
        self.notes.append(note)
        self.comment(note + "; not applied")

    def done(self) -> Exported:
        text = "\n".join(self.lines) + "\n"
        return Exported(text, self.notes, self.keys, self.setup, self.comments)


def _number(x: Any) -> Any:
    """16.0 -> 16: both tools declare lora_alpha (and the patterns' values) as integers."""
    return int(x) if isinstance(x, float) and x.is_integer() else x


def _model(rec: dict, y: _Yaml, key: str) -> None:
    model = rec.get("model")
    if model is None:
        y.comment(f"{key}: the run does not record its model; set it yourself")
    elif model in EMBEDDED:
        y.comment(f"rankwise's embedded {model!r} is {EMBEDDED[model]} (read from a GGUF)")
        y.key(key, EMBEDDED[model], lora=False)
    else:
        if str(model).endswith(".gguf"):
            y.comment(f"{model} is a GGUF file; {y.tool} needs the original model's weights")
        y.key(key, model, lora=False)


def _alpha(lora: dict, y: _Yaml, key: str) -> None:
    alpha = _number(lora.get("lora_alpha", 8))
    if isinstance(alpha, float):  # the tools take an integer: say what rounding does
        y.comment(
            f"lora_alpha {alpha}: {y.tool} takes an integer; rounded, which changes the "
            f"scale alpha/r by {round(alpha) / alpha:.3f}x"
        )
        alpha = max(1, round(alpha))
    y.key(key, alpha)


def _leftovers(lora: dict, handled: set[str], y: _Yaml) -> None:
    """Every other LoraConfig setting that differs from PEFT's default becomes a comment."""
    rest = {k: v for k, v in lora.items() if k not in handled | {"task_type", "r"}}
    if not rest:
        return
    import dataclasses

    from rankwise.io.quantize import import_peft

    LoraConfig = import_peft().LoraConfig  # bitsandbytes held back (rankwise.io.quantize)
    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(LoraConfig)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    }
    for k, v in rest.items():
        if k not in defaults or v != defaults[k]:
            y.unsupported(k, v)


def _rank(lora: dict, y, key: str) -> None:
    """The first LoRA keys of every tool: the rank (under ``key``), alpha and dropout."""
    y.key(key, lora["r"])
    _alpha(lora, y, "lora_alpha")
    y.key("lora_dropout", lora.get("lora_dropout", 0.0))


def _axolotl(rec: dict) -> Exported:
    lora, y = rec["lora_config"], _Yaml(rec, "axolotl")
    bits = QUANTIZE_BITS[rec.get("quantize")]
    _model(rec, y, "base_model")
    y.key("adapter", "qlora" if bits == 4 else "lora", lora=False)
    if bits:
        y.key(f"load_in_{bits}bit", True, lora=False)
    _rank(lora, y, "lora_r")
    targets = lora.get("target_modules")
    if targets == "all-linear":
        y.key("lora_target_linear", True)
    elif targets is None:
        y.comment("target_modules not recorded (PEFT's default for the architecture)")
    else:  # a list of names, or a string PEFT reads as a regex; axolotl passes both through
        y.key("lora_target_modules", targets)
    if lora.get("target_parameters"):  # a mixture of experts' fused weights
        y.key("lora_target_parameters", lora["target_parameters"])
    y.key("peft_use_rslora", bool(lora.get("use_rslora", False)))
    if lora.get("use_dora"):
        y.key("peft_use_dora", True)
    for ours, theirs in (
        ("rank_pattern", "lora_rank_pattern"),
        ("alpha_pattern", "lora_alpha_pattern"),
    ):
        if lora.get(ours):
            y.key(theirs, {k: _number(v) for k, v in lora[ours].items()})
    if lora.get("bias", "none") != "none":
        y.unsupported("bias", lora["bias"], "bias key (it trains LoRA with bias='none')")
    handled = {"lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora"}
    _leftovers(lora, handled | {"rank_pattern", "alpha_pattern", "bias", "target_parameters"}, y)
    _training(rec, y, "lr_scheduler")
    return y.done()


def _llama_factory(rec: dict) -> Exported:
    lora, y = rec["lora_config"], _Yaml(rec, "llama-factory")
    bits = QUANTIZE_BITS[rec.get("quantize")]
    _model(rec, y, "model_name_or_path")
    y.key("finetuning_type", "lora", lora=False)
    if bits:
        y.key("quantization_bit", bits, lora=False)
    _rank(lora, y, "lora_rank")
    targets = lora.get("target_modules")
    if targets == "all-linear":
        y.key("lora_target", "all")
    elif isinstance(targets, list):
        y.key("lora_target", ",".join(targets))
    elif targets is None:
        y.unsupported("target_modules", None, "key for PEFT's per-architecture default")
    else:
        y.unsupported("target_modules", targets, "regex targets (lora_target takes names)")
    return _flags_and_leftovers(rec, y)


def _trl(rec: dict) -> Exported:
    """TRL's ``ModelConfig`` keys (``trl sft --config``): they build its LoraConfig."""
    lora, y = rec["lora_config"], _Yaml(rec, "trl")
    bits = QUANTIZE_BITS[rec.get("quantize")]
    _model(rec, y, "model_name_or_path")
    y.key("use_peft", True)
    if bits:
        y.key(f"load_in_{bits}bit", True, lora=False)
    _rank(lora, y, "lora_r")
    targets = lora.get("target_modules")
    if targets is None:
        y.comment("target_modules not recorded (PEFT's default for the architecture)")
    else:  # TRL passes a list or "all-linear" through to LoraConfig
        y.key("lora_target_modules", targets)
    if lora.get("target_parameters"):  # ModelConfig.lora_target_parameters
        y.key("lora_target_parameters", lora["target_parameters"])
    return _flags_and_leftovers(rec, y, {"target_parameters"})


def _flags_and_leftovers(rec: dict, y: _Yaml, written: set[str] = frozenset()) -> Exported:
    """rsLoRA and DoRA as the tool's flags; what it has no key for (and the caller has not
    ``written``), said in a comment; then the schedule and NEFTune (TrainingArguments keys)."""
    lora = rec["lora_config"]
    y.key("use_rslora", bool(lora.get("use_rslora", False)))
    if lora.get("use_dora"):
        y.key("use_dora", True)
    for ours in ("rank_pattern", "alpha_pattern"):
        if lora.get(ours):
            y.unsupported(ours, lora[ours], f"per-module {ours.split('_')[0]} key")
    if lora.get("bias", "none") != "none":
        y.unsupported("bias", lora["bias"], "LoRA bias key")
    handled = {"lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora"}
    _leftovers(lora, handled | {"rank_pattern", "alpha_pattern", "bias"} | written, y)
    _training(rec, y, "lr_scheduler_type")
    return y.done()


def _training(rec: dict, y: _Yaml, key: str) -> None:
    """The schedule and NEFTune the trials trained with, in the tool's training keys (set
    up, not merged: ``--merge-into`` says where the file's differ). axolotl (``key``
    lr_scheduler) spells cosine_with_min_lr as its own cosine with ``cosine_min_lr_ratio``."""
    budget = rec.get("budget") or {}
    name, kwargs = budget.get("lr_scheduler"), dict(budget.get("lr_scheduler_kwargs") or {})
    if name is None:
        return  # recorded before schedules were: it trained rankwise's linear
    if key == "lr_scheduler" and name == "cosine_with_min_lr" and set(kwargs) == {"min_lr_rate"}:
        name, ratio = "cosine", kwargs.pop("min_lr_rate")
        y.key(key, name, lora=False)
        y.key("cosine_min_lr_ratio", ratio, lora=False)
    else:
        y.key(key, name, lora=False)
    if kwargs:
        y.key("lr_scheduler_kwargs", kwargs, lora=False)
    if budget.get("neftune_alpha"):
        y.key("neftune_noise_alpha", budget["neftune_alpha"], lora=False)


def _peft(rec: dict) -> Exported:
    config = {"peft_type": "LORA", **rec["lora_config"]}
    model = EMBEDDED.get(rec.get("model"), rec.get("model"))
    if model is not None:
        config["base_model_name_or_path"] = model
    notes = []
    bits = QUANTIZE_BITS[rec.get("quantize")]
    if bits:
        notes.append(
            f"quantize {rec['quantize']}: not a LoraConfig setting; load the base model with "
            f"BitsAndBytesConfig(load_in_{bits}bit=True)"
        )
    if serve := rec.get("serve"):
        notes.append(f"serve with vLLM: --max-lora-rank {serve['max_lora_rank']}")
    return Exported(json.dumps(config, indent=2) + "\n", notes)
