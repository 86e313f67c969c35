"""Options: parsing, validation with the flag's name, YAML, and the shipped examples."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from rankwise.cli import COMMANDS, load_yaml, main
from rankwise.config import GROUPS, EstimateConfig, Options, flag, parse_duration, parse_size
from rankwise.errors import ConfigError


@pytest.mark.parametrize(
    "text,expected",
    [
        ("20GiB", 20 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5g", int(1.5 * 2**30)),
        (1000, 1000),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text, "max_memory") == expected


@pytest.mark.parametrize("bad", ["20XB", "-1GiB", "lots", "0", True])
def test_parse_size_rejects_with_flag_name(bad):
    with pytest.raises(ConfigError, match="--max-memory"):
        parse_size(bad, "max_memory")


def test_parse_duration():
    assert parse_duration("30m", "max_time") == 1800
    assert parse_duration("2h", "max_time") == 7200
    assert parse_duration(90, "max_time") == 90
    with pytest.raises(ConfigError, match="--max-time"):
        parse_duration("soon", "max_time")


@pytest.mark.parametrize(
    "flat,flag",
    [
        ({"ranks": "4,0"}, "--ranks"),
        ({"ranks": "4,x"}, "--ranks"),
        ({"ranks": [2.5]}, "--ranks"),
        ({"start_rank": 3}, "--start-rank"),
        ({"max_steps": 0}, "--max-steps"),
        ({"lr": -1.0}, "--lr"),
        ({"val_fraction": 1.5}, "--val-fraction"),
        ({"dropout": 1.0}, "--dropout"),
        ({"alpha_policy": "magic"}, "--alpha-policy"),
        ({"strategy": "random"}, "--strategy"),
        ({"max_time": "-3m"}, "--max-time"),
    ],
)
def test_invalid_options_name_the_flag(flat, flag):
    with pytest.raises(ConfigError, match=flag):
        Options.from_flat(flat)


def test_unknown_option_is_refused():
    with pytest.raises(ConfigError, match="unknown option 'rnak'"):
        Options.from_flat({"rnak": 4}, "x.yaml")


def test_identity_ignores_runtime_options():
    a = Options.from_flat({"out": "a", "quiet": True, "max_rank": 8})
    b = Options.from_flat({"out": "b", "quiet": False})
    assert a.identity() == b.identity()
    assert a.identity() != Options.from_flat({"lr": 1e-3}).identity()


def test_alpha_policies_scaling():
    fixed = Options.from_flat({"alpha": 16}).lora
    assert fixed.alpha_for(8) == 16 and fixed.scaling(8) == 2.0
    rs = Options.from_flat({"alpha_policy": "rslora", "alpha": 16}).lora
    assert rs.scaling(16) == pytest.approx(4.0)
    ratio = Options.from_flat({"alpha_policy": "ratio", "alpha_ratio": 2}).lora
    assert ratio.alpha_for(8) == 16 and ratio.scaling(32) == 2.0


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("examples/*.yaml")))
def test_every_shipped_config_parses(path):
    opts = Options.from_flat(load_yaml(str(path)), str(path))
    assert opts.search.ranks == sorted(opts.search.ranks)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_documents_every_option(command, capsys):
    """Every command is generated from its declaration: each option it declares is in its
    full help (a search's: --help-all), and each has the one --debug."""
    options = COMMANDS[command].options
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help-all" if options is Options else "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for klass in GROUPS.values() if options is Options else [options]:
        for f in dataclasses.fields(klass):
            assert (f.name if f.metadata.get("positional") else flag(f.name)) in text, f.name
    assert text.count("--debug, --no-debug") == 1


def test_estimate_reuses_the_search_declaration():
    """estimate's options that a search also takes are the search's: choices, checks and
    defaults, but for the two defaults it overrides (config/commands.py says why)."""

    def default(f):
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    shared = [f for f in dataclasses.fields(EstimateConfig) if "declared_in" in f.metadata]
    assert len(shared) >= 11
    differ = {}
    for f in shared:
        source = next(s for s in dataclasses.fields(f.metadata["declared_in"]) if s.name == f.name)
        if default(f) != default(source):
            differ[f.name] = default(f)
        if f.name != "dtype":  # estimate predicts for a named dtype: no auto
            assert f.metadata["choices"] == source.metadata["choices"], f.name
    assert differ == {"device": "cpu", "dtype": "float32"}
    with pytest.raises(ConfigError, match=r"--seq-len: must be > 0, got 0"):
        EstimateConfig(seq_len=0)  # the search's check, in its words
    with pytest.raises(ConfigError, match="--dtype: expected one of float32"):
        EstimateConfig(dtype="auto")
    assert EstimateConfig(ranks="16,4", target_modules="q_proj, v_proj").ranks == [4, 16]
