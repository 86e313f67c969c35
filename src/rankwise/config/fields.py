"""How an option is declared (:func:`opt`) and the parsers of sizes, durations and lists."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field
from typing import Any

from rankwise.errors import ConfigError  # noqa: F401  (re-exported: the config's own error)

# The ranks a search may try by default: powers of two, as PEFT users pick them.
DEFAULT_RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256]

# The LoRA ranks vLLM loads (its --max-lora-rank must be one of them, and an adapter's ranks
# must fit under it), and its default --max-lora-rank: vllm/config/lora.py.
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX = 16


def opt(
    default: Any = None,
    help: str = "",
    *,
    identity: bool = True,
    choices=None,
    everyday: str | None = None,
    positional: bool = False,
    required: bool = False,
    metavar: str | None = None,
    **kw,
):
    """A dataclass field with CLI/YAML metadata.

    identity=False marks options that do not change results (output, logging,
    budgets that only cut a search short): a resumed run may change them.
    ``everyday`` marks the options a first-time user needs: ``rankwise search --help``
    shows them, each with this one-line summary of its help (``--help-all`` shows every
    option with its whole help). ``positional``, ``required`` and ``metavar`` shape the
    argument on the command line (``rankwise show DIR``, ``export --to TOOL``).
    """
    meta = {
        "help": help,
        "identity": identity,
        "choices": choices,
        "everyday": everyday,
        "positional": positional,
        "required": required,
        "metavar": metavar,
    }
    return _field(default, meta, **kw)


def _field(default: Any, meta: dict, **kw):
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def shared(klass: type, name: str, **overrides):
    """The option ``name`` as ``klass`` declares it, for another command that takes it too
    (``rankwise estimate --seq-len``): the same help, choices, default and checks
    (``declared_in``: :func:`check_shared` runs them). ``overrides`` replaces the default or
    the choices; say why beside it.
    """
    source = next(f for f in dataclasses.fields(klass) if f.name == name)
    if source.default is not dataclasses.MISSING:
        default = source.default
    else:
        default = source.default_factory()
    default = overrides.pop("default", default)
    return _field(default, {**source.metadata, **overrides, "declared_in": klass})


def check_shared(obj) -> None:
    """Check (and normalise: comma lists, sorted ranks) the :func:`shared` options of ``obj``
    as the groups that declare them do, so the errors are theirs, naming the flag."""
    by_group: dict[type, list[str]] = {}
    for f in dataclasses.fields(obj):
        if "declared_in" in f.metadata:
            by_group.setdefault(f.metadata["declared_in"], []).append(f.name)
    for klass, names in by_group.items():
        group = klass(**{n: getattr(obj, n) for n in names})
        for n in names:
            setattr(obj, n, getattr(group, n))


# Options whose flag is not their name: ``from`` is a Python keyword, so the option is
# ``recipe`` in YAML and keyword arguments and ``--from`` on the command line.
FLAG_NAMES = {"recipe": "from"}


def flag(name: str) -> str:
    return "--" + FLAG_NAMES.get(name, name).replace("_", "-")


def parse_serve(value: Any) -> tuple[str, int] | None:
    """``--serve``: 'vllm' or 'vllm:N' -> ('vllm', max rank); N must be a rank vLLM loads.

    >>> parse_serve("vllm"), parse_serve("vllm:64"), parse_serve(None)
    (('vllm', 16), ('vllm', 64), None)
    """
    if value is None:
        return None
    engine, sep, cap = str(value).strip().partition(":")
    if engine != "vllm":
        raise ConfigError(f"--serve: expected vllm or vllm:MAX_LORA_RANK, got {value!r}")
    if not sep:
        return engine, VLLM_DEFAULT_MAX
    if not cap.strip().isdigit() or int(cap) not in VLLM_RANKS:
        raise ConfigError(
            f"--serve {value}: {cap.strip()!r} is not a rank vLLM loads; expected one of "
            f"{', '.join(map(str, VLLM_RANKS))}"
        )
    return engine, int(cap)


def serve_round_up(rank: int) -> int:
    """The smallest rank vLLM loads that holds ``rank`` (512 at most).

    >>> [serve_round_up(r) for r in (1, 2, 5, 16, 300, 321)]
    [1, 8, 8, 16, 320, 512]
    """
    return next((r for r in VLLM_RANKS if r >= rank), VLLM_RANKS[-1])


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
    "t": 2**40,
}


def parse_size(value: Any, name: str) -> int | None:
    """'20GiB' -> bytes. Integers are taken as bytes."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{flag(name)}: expected a size like 20GiB or 512MB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ConfigError(
                f"{flag(name)}: expected a size like 20GiB, 512MB or 1000000 (bytes), got {value!r}"
            )
        number, unit = float(m.group(1)), m.group(2).lower()
    if number <= 0:
        raise ConfigError(f"{flag(name)}: must be positive, got {value!r}")
    return int(number * _SIZE_UNITS[unit])


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}


def parse_duration(value: Any, name: str) -> float | None:
    """'30m' -> 1800.0 seconds. Plain numbers are seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{flag(name)}: expected a duration like 90s, 30m or 2h, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
        if not m or m.group(2).lower() not in _DURATION_UNITS:
            raise ConfigError(
                f"{flag(name)}: expected a duration like 90s, 30m or 2h, got {value!r}"
            )
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    if seconds <= 0:
        raise ConfigError(f"{flag(name)}: must be positive, got {value!r}")
    return seconds


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _positive(obj, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{flag(name)}: expected a number, got {value!r}")
        if value < 0 or (value == 0 and not allow_zero) or not math.isfinite(value):
            bound = ">= 0" if allow_zero else "> 0"
            raise ConfigError(f"{flag(name)}: must be {bound}, got {value!r}")


def _integer(obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{flag(name)}: expected an integer, got {value!r}")


def _choice(obj, name: str) -> None:
    choices = next(f for f in dataclasses.fields(obj) if f.name == name).metadata["choices"]
    if getattr(obj, name) not in choices:
        raise ConfigError(
            f"{flag(name)}: expected one of {', '.join(choices)}, got {getattr(obj, name)!r}"
        )


def _float_item(text: str, name: str) -> float:
    try:
        return float(text.strip())
    except ValueError:
        raise ConfigError(f"{flag(name)}: expected numbers, got {text.strip()!r}") from None


def _int_item(text: str, name: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(f"{flag(name)}: expected integers, got {text.strip()!r}") from None
