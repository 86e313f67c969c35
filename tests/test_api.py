"""The package's surface: ``import rankwise`` changes nothing, no public name hides a
submodule, and ``rankwise.search`` takes the typed :class:`rankwise.Options`."""

from __future__ import annotations

import importlib
import json
import pkgutil
import subprocess
import sys
import textwrap

import pytest

import rankwise
from rankwise import Options
from rankwise.config import ConfigError
from rankwise.study import study as study_module

from .conftest import fast_args


def test_import_has_no_side_effects():
    """In a fresh process: no import hook installed, and neither torch nor PEFT imported
    (each costs seconds, and PEFT would import bitsandbytes: rankwise.io.quantize)."""
    script = textwrap.dedent(
        """
        import sys
        before = list(sys.meta_path)
        import rankwise
        print(sys.meta_path == before, sorted(m for m in ("torch", "peft", "transformers",
              "bitsandbytes") if m in sys.modules))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "True []", done.stdout + done.stderr


def submodules() -> set[str]:
    return {m.name for m in pkgutil.iter_modules(rankwise.__path__)}


def test_no_public_name_hides_a_submodule():
    """``rankwise.X`` is the submodule X wherever one exists: a function of the same name
    would be replaced by the module as soon as anything imported ``rankwise.X``."""
    names = set(dir(rankwise)) | set(rankwise.__all__)
    assert names >= set(rankwise.__all__)  # the lazy estimate is listed too
    assert not set(rankwise.__all__) & submodules(), set(rankwise.__all__) & submodules()
    for name in names & submodules():
        assert getattr(rankwise, name) is importlib.import_module(f"rankwise.{name}"), name
    assert {"core", "study", "config"} <= submodules()  # the check sees the packages


@pytest.fixture
def studied(monkeypatch):
    """search() up to the Study it would run: the Options it was given, nothing trained."""
    seen: list[Options] = []

    class Recorder:
        def __init__(self, opts):
            seen.append(opts)

        def run(self):
            return "ran"

    monkeypatch.setattr(study_module, "Study", Recorder)
    return seen


def test_search_takes_typed_options(studied):
    opts = Options.from_flat({"ranks": [1, 4], "seed": 2, "max_steps": 7})
    assert rankwise.search(options=opts) == "ran" and studied[-1] == opts
    # keywords override the options' fields, as flags override --config; the rest is kept
    rankwise.search("my-model", options=opts, seed=5, ranks="8,2")
    got = studied[-1]
    assert (got.model.model, got.train.seed, got.search.ranks) == ("my-model", 5, [2, 8])
    assert got.train.max_steps == 7 and opts.train.seed == 2  # the given Options unchanged
    # keywords alone build the same Options
    assert rankwise.search(ranks=[1, 4], seed=2, max_steps=7) == "ran" and studied[-1] == opts


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: rankwise.search(options=Options(), bogus=1), ConfigError, "unknown option"),
        (lambda: rankwise.search(options=Options(), ranks=[0]), ConfigError, "--ranks"),
        (lambda: rankwise.search(options=Options(), recipe="x.yml"), ConfigError, "recipe="),
        (lambda: rankwise.search(options={"ranks": [1]}), TypeError, "rankwise.Options"),
    ],
    ids=["unknown keyword", "bad keyword", "recipe", "not Options"],
)
def test_search_refuses_clearly(studied, call, error, match):
    with pytest.raises(error, match=match):
        call()
    assert not studied


def test_search_with_options_end_to_end(tmp_path, llama_dir, text_jsonl):
    opts = Options.from_flat(
        {**fast_args(), "model": str(llama_dir), "train": str(text_jsonl), "ranks": [1]}
    )
    result = rankwise.search(options=opts, out=str(tmp_path / "run"))
    assert result.recommendation.rank == 1
    assert json.loads((tmp_path / "run" / "recommendation.json").read_text())["rank"] == 1
