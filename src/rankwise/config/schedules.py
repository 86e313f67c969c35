"""The learning-rate schedules a trial can follow: transformers' ``get_scheduler`` types,
the arguments each takes (``--lr-scheduler-kwargs``) and ``--min-lr-ratio`` where a
schedule has a floor.

The names are written here so that ``--help`` and a bad name cost no transformers import;
tests/test_recipe_fidelity.py checks them against the pinned ``transformers.SchedulerType``.
The arguments are read from the schedule functions' own signatures when they are given.

Example:
    >>> schedule_kwargs("cosine_with_min_lr", None, 0.1)
    {'min_lr_rate': 0.1}
    >>> schedule_kwargs("cosine", {"num_cycles": 1.5}, None)
    {'num_cycles': 1.5}
"""

from __future__ import annotations

import inspect
import json
from typing import Any

from rankwise.errors import ConfigError

__all__ = [
    "SCHEDULERS",
    "ON_METRIC",
    "MIN_LR_ARGUMENT",
    "STEP_ARGUMENTS",
    "parse_schedule_kwargs",
    "schedule_kwargs",
    "check_schedule",
]

# transformers.SchedulerType (5.x), in its order. linear is rankwise's own (see
# rankwise.training.schedule): HF's decay, with a warm-up that never trains at rate 0.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
    "greedy",
)
# Schedules that follow the validation score instead of the step: stepped with the
# objective at each evaluation, as transformers' Trainer steps them with eval_loss.
ON_METRIC = ("reduce_lr_on_plateau", "greedy")
# The argument --min-lr-ratio sets (the floor as a share of the peak rate), per schedule.
MIN_LR_ARGUMENT = {
    "cosine_with_min_lr": "min_lr_rate",
    "cosine_warmup_with_min_lr": "min_lr_rate",
    "warmup_stable_decay": "min_lr_ratio",
}
# Arguments counted in optimizer steps: --trial-budget shrinks them as it does the warm-up.
STEP_ARGUMENTS = ("num_decay_steps", "num_stable_steps", "timescale")
# What the trial passes itself: from --warmup-steps and its own number of steps.
_SUPPLIED = ("optimizer", "num_warmup_steps", "num_training_steps", "last_epoch")


def parse_schedule_kwargs(value: Any) -> dict[str, Any] | None:
    """``--lr-scheduler-kwargs``: a JSON object (a mapping in YAML), or None.

    >>> parse_schedule_kwargs('{"num_cycles": 2}'), parse_schedule_kwargs(None)
    ({'num_cycles': 2}, None)
    """
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    raise ConfigError(
        f"--lr-scheduler-kwargs: expected a JSON object like '{{\"num_cycles\": 1}}', got {value!r}"
    )


def _arguments(name: str) -> dict[str, inspect.Parameter]:
    """The arguments schedule ``name`` takes beyond what a trial supplies (its signature;
    the metric-driven ones take their scheduler class's)."""
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    func = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    if name in ON_METRIC:  # get_scheduler passes every argument on to the scheduler class
        from torch.optim.lr_scheduler import ReduceLROnPlateau
        from transformers.optimization import GreedyLR

        func = {"reduce_lr_on_plateau": ReduceLROnPlateau, "greedy": GreedyLR}[name]
    params = inspect.signature(func).parameters
    return {
        k: p
        for k, p in params.items()
        if k not in (*_SUPPLIED, "self") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    }


def schedule_kwargs(name: str, kwargs: dict | None, min_lr_ratio: float | None) -> dict:
    """What the trial passes to ``get_scheduler`` as ``scheduler_specific_kwargs``: the
    given arguments, and ``--min-lr-ratio`` under the schedule's own name for it."""
    out = dict(kwargs or {})
    if min_lr_ratio is not None:
        out[MIN_LR_ARGUMENT[name]] = min_lr_ratio
    return out


def check_schedule(name: str, kwargs: dict | None, min_lr_ratio: float | None) -> None:
    """Refuse arguments the schedule does not take or lacks, and a --min-lr-ratio where it
    has no floor; then build it once on a dummy optimizer, so that transformers' own checks
    fail here, naming the flag, and not in every trial."""
    if min_lr_ratio is not None:
        _check_min_lr(name, kwargs, min_lr_ratio)
    if name == "linear" and not kwargs:
        return  # rankwise's own schedule: nothing to import or check
    takes = _arguments(name)
    shown = ", ".join(takes) or "none"
    for key in kwargs or {}:
        if key in _SUPPLIED:
            raise ConfigError(
                f"--lr-scheduler-kwargs: {key} is set by the search (--warmup-steps and the "
                "trial's steps), not by the schedule's arguments"
            )
        if key not in takes:
            raise ConfigError(
                f"--lr-scheduler-kwargs: {name} takes no argument {key!r}; it takes {shown}"
            )
    given = schedule_kwargs(name, kwargs, min_lr_ratio)
    missing = [k for k, p in takes.items() if p.default is p.empty and k not in given]
    if missing:
        raise ConfigError(
            f"--lr-scheduler {name}: needs {', '.join(missing)} in --lr-scheduler-kwargs"
        )
    if "min_lr_rate" in takes and not {"min_lr_rate", "min_lr"} & set(given):
        raise ConfigError(
            f"--lr-scheduler {name}: needs --min-lr-ratio (the floor as a share of the peak "
            "rate), or min_lr in --lr-scheduler-kwargs"
        )
    _build_once(name, given)


def _check_min_lr(name: str, kwargs: dict | None, ratio: float) -> None:
    if name not in MIN_LR_ARGUMENT:
        raise ConfigError(
            f"--min-lr-ratio: applies to --lr-scheduler {', '.join(MIN_LR_ARGUMENT)} "
            f"(a schedule with a floor), not {name}"
        )
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise ConfigError(f"--min-lr-ratio: expected a share in [0, 1], got {ratio!r}")
    clash = {MIN_LR_ARGUMENT[name], "min_lr"} & set(kwargs or {})
    if clash:
        raise ConfigError(
            f"--min-lr-ratio: {name}'s floor is also given as {sorted(clash)[0]} in "
            "--lr-scheduler-kwargs; give one"
        )


def _build_once(name: str, kwargs: dict) -> None:
    import torch
    from transformers import get_scheduler

    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=1.0)
    try:
        get_scheduler(name, optimizer, 1, 10, scheduler_specific_kwargs=dict(kwargs))
    except (TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"--lr-scheduler {name}: {reason}") from None
