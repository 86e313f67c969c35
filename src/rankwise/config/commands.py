"""The options of the commands other than ``search``: estimate, show, report, inspect, export.

Like a search's groups, each is one dataclass the command line is generated from
(``rankwise.cli``). ``estimate`` takes many of a search's options: it reuses their
declaration (:func:`~rankwise.config.fields.shared`), so their choices, checks and (unless a
prediction needs other words) help are the search's, and says where its default differs
and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from rankwise.config.fields import _choice, check_shared, opt, shared
from rankwise.config.groups import DataConfig, LoraSettings, ModelConfig, TrainConfig
from rankwise.config.search import SearchConfig
from rankwise.errors import ConfigError

__all__ = [
    "EXPORT_TOOLS",
    "EstimateConfig",
    "ShowConfig",
    "ReportConfig",
    "InspectConfig",
    "ExportConfig",
]

# The tools ``rankwise export --to`` writes for (rankwise.report.export).
EXPORT_TOOLS = ("axolotl", "llama-factory", "trl", "peft")


@dataclass
class EstimateConfig:
    """Options of ``rankwise estimate``: what each rank would cost, before training."""

    model: str = shared(ModelConfig, "model")
    ranks: list[int] = shared(SearchConfig, "ranks")
    target_modules: list[str] | None = shared(LoraSettings, "target_modules")
    target_parameters: list[str] | None = shared(LoraSettings, "target_parameters")
    bias: str = shared(LoraSettings, "bias")
    use_dora: bool = shared(
        LoraSettings,
        "use_dora",
        help="Predict for DoRA adapters: one magnitude per output feature of each adapted "
        "module, and the two outputs per token it scales.",
    )
    batch_size: int = shared(TrainConfig, "batch_size")
    seq_len: int = shared(DataConfig, "seq_len")
    # The two defaults that differ from a search's. A search resolves ``auto`` on the machine
    # it trains on; an estimate predicts for a machine it names, so its answer does not
    # depend on where it is asked: the CPU (whose baseline, this process's resident memory,
    # it adds) and float32 weights, the bytes per weight of one named dtype (auto's bf16
    # autocast is the hardware's choice, not a size).
    device: str = shared(
        ModelConfig,
        "device",
        default="cpu",
        help="Device the memory is predicted for: cpu (adds this process's baseline), cuda, "
        "cuda:N.",
    )
    dtype: str = shared(
        ModelConfig,
        "dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="Dtype of the base weights.",
    )
    gradient_checkpointing: bool = opt(False, "Predict activations with gradient checkpointing.")
    calibrate: bool = opt(
        False,
        "Load the model (else only its config is read) and time a few real steps at the "
        "smallest and largest rank to predict time per step and per trial.",
    )
    max_steps: int = shared(
        TrainConfig, "max_steps", help="Steps per trial, for the predicted trial time."
    )
    json: bool = opt(False, "Print a JSON list, one object per rank.")
    trust_remote_code: bool = shared(ModelConfig, "trust_remote_code")
    quantize: str = shared(
        ModelConfig,
        "quantize",
        help="Predict for a base loaded in 4bit or 8bit (bitsandbytes; linear layers at 0.5 "
        "or 1 byte per weight plus their quantisation state), or none.",
    )

    def __post_init__(self):
        _choice(self, "dtype")  # estimate's own choices: no auto
        check_shared(self)


@dataclass
class ShowConfig:
    """Options of ``rankwise show``."""

    dir: str = opt(None, "A run directory (finished, interrupted or live).", positional=True)


@dataclass
class ReportConfig:
    """Options of ``rankwise report``."""

    dir: str = opt(None, "A run directory.", positional=True)
    open: bool = opt(False, "Open it in a browser.")


@dataclass
class InspectConfig:
    """Options of ``rankwise inspect``."""

    dir: str = opt(
        None, "A PEFT LoRA adapter folder (adapter_config.json + safetensors).", positional=True
    )
    energy: float = opt(
        0.9, "Share of each module's update energy the proposed rank_pattern keeps."
    )
    json: bool = opt(False, "Print one JSON object.")
    figure: str | None = opt(None, "Save a heat map of the effective ranks.", metavar="PATH")


@dataclass
class ExportConfig:
    """Options of ``rankwise export``."""

    dir: str = opt(None, "A finished run directory (holding recommendation.json).", positional=True)
    to: str = opt(
        None,
        "axolotl, llama-factory or trl: YAML keys to merge into that tool's config; peft: "
        "LoraConfig keyword arguments as JSON.",
        choices=list(EXPORT_TOOLS),
        required=True,
    )
    merge_into: str | None = opt(
        None,
        "Write the answer into this training config of the --to tool, keeping every other "
        "key, the order and the comments (to --output, default FILE.rankwise.yml).",
        metavar="FILE",
    )
    in_place: bool = opt(False, "--merge-into: rewrite FILE itself.")
    output: str | None = opt(None, "File to write (default: standard output).")

    def __post_init__(self):
        if self.in_place and not self.merge_into:
            raise ConfigError("--in-place: needs --merge-into FILE")
