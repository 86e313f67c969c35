"""Typed configuration: one dataclass per concern.

These dataclasses are the single source of truth for every option of every command. The
CLI (`rankwise search --help-all`, and every other command's flags), the YAML keys
(`--config FILE`) and the Python API (`rankwise.search(options=Options(...))`, or its
keyword arguments) are all generated from them. A search's everyday options are marked
``everyday=True`` (`rankwise search --help`); the other commands' are in
:mod:`rankwise.config.commands`.

Each field carries its help text in ``metadata["help"]``. Validation happens in
``__post_init__`` and raises :class:`ConfigError` naming the flag.

Example:
    >>> cfg = SearchConfig(ranks=[1, 4, 16])
    >>> cfg.start_rank_for(n_params=135_000_000), cfg.start_rank_for(n_params=70_000_000_000)
    (4, 16)
"""

from rankwise.config.commands import (
    EXPORT_TOOLS,
    EstimateConfig,
    ExportConfig,
    InspectConfig,
    ReportConfig,
    ShowConfig,
)
from rankwise.config.fields import (
    DEFAULT_RANKS,
    VLLM_RANKS,
    flag,
    format_bytes,
    opt,
    parse_duration,
    parse_serve,
    parse_size,
    serve_round_up,
)
from rankwise.config.groups import (
    DataConfig,
    ExecutorConfig,
    LoraSettings,
    ModelConfig,
    RunConfig,
    TrainConfig,
    parse_resources,
)
from rankwise.config.options import GROUPS, Options
from rankwise.config.search import SearchConfig
from rankwise.errors import ConfigError

__all__ = [
    "ConfigError",
    "DEFAULT_RANKS",
    "VLLM_RANKS",
    "EstimateConfig",
    "ShowConfig",
    "ReportConfig",
    "InspectConfig",
    "ExportConfig",
    "EXPORT_TOOLS",
    "ModelConfig",
    "DataConfig",
    "LoraSettings",
    "TrainConfig",
    "SearchConfig",
    "RunConfig",
    "ExecutorConfig",
    "Options",
    "GROUPS",
    "flag",
    "opt",
    "parse_size",
    "parse_serve",
    "serve_round_up",
    "parse_duration",
    "parse_resources",
    "format_bytes",
]
