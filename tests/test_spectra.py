"""Adapter spectra: parity with PEFT's own delta weights, planted ranks, the CLI, the checks.

Adapters are written by plain PEFT (``get_peft_model(...).save_pretrained``) for tiny
models built in-process; planted updates have k orthonormal directions of equal weight,
so their effective rank is exactly k at any energy share below 100%.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rankwise.analysis.spectra import (
    effective_rank,
    inspect_adapter,
    module_kinds,
    stable_rank,
    update_singular_values,
)
from rankwise.cli import main
from rankwise.errors import ConfigError
from rankwise.testing import save_tiny_adapter, tiny_model
from rankwise.training.patterns import verify_ranks

PLANTED = {"q_proj": 2, "v_proj": 6}


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """A Llama adapter, r=8 on q/v, whose q updates have rank 2 and v updates rank 6."""
    path = tmp_path_factory.mktemp("adapters") / "planted"
    return save_tiny_adapter(path, "llama", PLANTED, r=8, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory):
    """A GPT-2 adapter on every Conv1D (fan_in_fan_out), c_attn updates of rank 3."""
    return save_tiny_adapter(tmp_path_factory.mktemp("adapters") / "gpt2", "gpt2", {"c_attn": 3})


@pytest.mark.parametrize(
    ("fan_out", "fan_in", "r", "scaling"),
    [(64, 128, 8, 2.0), (192, 64, 8, 0.5), (64, 64, 16, 16 / 4), (48, 640, 3, 1.0)],
)
def test_qr_singular_values_equal_the_dense_ones(fan_out, fan_in, r, scaling):
    gen = torch.Generator().manual_seed(fan_out + fan_in + r)
    a = torch.randn(r, fan_in, generator=gen)
    b = torch.randn(fan_out, r, generator=gen)
    dense = torch.linalg.svdvals(scaling * b.double() @ a.double())[:r]
    got = update_singular_values(a, b, scaling)
    assert got.shape == (r,)
    torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-10)


LORA_CASES = {
    "llama": ("llama", {}),
    "llama-rslora": ("llama", {"use_rslora": True, "lora_alpha": 16}),
    "llama-patterns": (
        "llama",
        {
            "lora_alpha": 16,
            "rank_pattern": {"model.layers.0.self_attn.q_proj": 4, "down_proj": 2},
            "alpha_pattern": {"v_proj": 32, r"layers\.1\.mlp\.up_proj": 3},
        },
    ),
    "gpt2-conv1d": ("gpt2", {}),
    "gpt2-rslora-patterns": (
        "gpt2",
        {"use_rslora": True, "rank_pattern": {"c_attn": 4}, "alpha_pattern": {"mlp.c_proj": 2}},
    ),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_spectra_match_peft_delta_weights(tmp_path, case):
    """Every module's singular values equal those of PEFT's own ``get_delta_weight``."""
    from peft import PeftModel

    arch, lora = LORA_CASES[case]
    path = save_tiny_adapter(tmp_path / "adapter", arch, seed=1, r=8, **lora)
    spectra = inspect_adapter(path)
    loaded = PeftModel.from_pretrained(tiny_model(arch), path)
    built = {n.removeprefix("base_model.model."): m for n, m in loaded.named_modules()}
    assert len(spectra.modules) == (14 if arch == "llama" else 8)
    for m in spectra.modules:
        layer = built[m.name]
        assert m.rank == layer.r["default"] and m.scaling == pytest.approx(layer.scaling["default"])
        dense = torch.linalg.svdvals(layer.get_delta_weight("default").double())[: m.rank]
        sv = torch.tensor(m.singular_values, dtype=torch.float64)
        torch.testing.assert_close(sv, dense, rtol=1e-5, atol=1e-7)
    if case == "llama-patterns":
        ranks = {m.name: m.rank for m in spectra.modules}
        assert ranks["model.layers.0.self_attn.q_proj"] == 4
        assert ranks["model.layers.1.self_attn.q_proj"] == 8
        assert ranks["model.layers.1.mlp.down_proj"] == 2


def test_planted_ranks_are_found_and_proposed(planted_dir):
    spectra = inspect_adapter(planted_dir, energy=0.9)
    found = {(m.kind, m.layer): m for m in spectra.modules}
    assert sorted(found) == [("q_proj", 0), ("q_proj", 1), ("v_proj", 0), ("v_proj", 1)]
    for (kind, _), m in found.items():
        assert m.rank == 8
        assert m.effective_rank(0.9) == m.effective_rank(0.99) == PLANTED[kind]
        assert m.stable_rank == pytest.approx(PLANTED[kind])
    # equal directions: each module's share of the total energy is its rank's share
    assert spectra.norm_share(found["q_proj", 0]) == pytest.approx(2 / 16, rel=1e-4)
    proposal = spectra.proposal()
    assert proposal.ranks == {m.name: PLANTED[m.kind] for m in spectra.modules}
    assert proposal.r == 2 and set(proposal.rank_pattern.values()) == {6}
    assert proposal.uniform_params == proposal.adapter_params == 4 * 8 * 128
    assert proposal.params == 2 * (2 + 6) * 128 < proposal.uniform_params


def test_proposed_pattern_gives_those_ranks_in_peft(planted_dir):
    from peft import LoraConfig, get_peft_model

    spectra = inspect_adapter(planted_dir)
    config = LoraConfig(**spectra.proposed_config())
    built = verify_ranks(get_peft_model(tiny_model("llama"), config), config)
    assert built == spectra.proposal().ranks


def test_gpt2_conv1d_adapter(gpt2_adapter):
    spectra = inspect_adapter(gpt2_adapter)
    assert spectra.config["fan_in_fan_out"] is True
    kinds = {m.kind for m in spectra.modules}
    assert kinds == {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"}
    c_attn = [m for m in spectra.modules if m.kind == "c_attn"]
    assert [(m.layer, m.fan_in, m.fan_out) for m in c_attn] == [(0, 64, 192), (1, 64, 192)]
    assert all(m.effective_rank(0.9) == 3 for m in c_attn)
    assert all(m.effective_rank(0.9) == 8 for m in spectra.modules if m.kind != "c_attn")


def test_module_types_and_layers_from_names():
    kinds = module_kinds(
        [
            "model.layers.3.self_attn.q_proj",
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_proj",
            "model.layers.1.mlp.experts.7.up_proj",
            "lm_head",
        ]
    )
    assert kinds == {
        "model.layers.3.self_attn.q_proj": ("q_proj", 3),
        "transformer.h.0.attn.c_proj": ("attn.c_proj", 0),
        "transformer.h.0.mlp.c_proj": ("mlp.c_proj", 0),
        "model.layers.1.mlp.experts.7.up_proj": ("up_proj", 1),
        "lm_head": ("lm_head", None),
    }


def test_effective_and_stable_rank_edge_cases():
    assert effective_rank([0.0, 0.0], 0.9) == 0 and stable_rank([0.0, 0.0]) == 0.0
    assert effective_rank([1.0, 1.0, 1.0, 1.0], 1.0) == 4
    assert effective_rank([1.0, 1.0, 1e-9], 1.0) == 2  # float noise is not a direction
    assert stable_rank([2.0, 1.0]) == pytest.approx(1.25)
    with pytest.raises(ConfigError, match="--energy"):
        effective_rank([1.0], 0.0)


def test_cli_prints_the_table(planted_dir, capsys):
    assert main(["inspect", str(planted_dir)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("type"))
    assert header.split() == [
        "type",
        "layer",
        "rank",
        "eff@90",
        "eff@99",
        "stable",
        "share",
        "prop@0.9",
    ]
    assert any(line.split()[:5] == ["v_proj", "1", "8", "6", "6"] for line in out.splitlines())
    assert "r=2, rank_pattern=" in out and "2,048 proposed vs 4,096 uniform r=8" in out


def test_cli_json_and_figure(planted_dir, tmp_path, capsys):
    figure = tmp_path / "ranks.png"
    assert (
        main(["inspect", str(planted_dir), "--json", "--energy", "0.5", "--figure", str(figure)])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["energy"] == 0.5 and len(data["modules"]) == 4
    # at 50% energy, equal directions need half of them
    assert [m["proposed_rank"] for m in data["modules"]] == [1, 3, 1, 3]
    assert data["proposal"]["lora_config"]["r"] in (1, 3)
    assert {row["type"] for row in data["summary"]} == {"q_proj", "v_proj"}
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


def _edited(edit):
    """A case's folder: a copy of the planted adapter, then ``edit(copy)``."""

    def make(planted_dir, tmp_path):
        copy = shutil.copytree(planted_dir, tmp_path / "copy")
        edit(copy)
        return copy

    return make


def _truncate(path):
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


BAD = {
    "missing dir": (lambda d, t: t / "nope", [], ["nope: no such directory"]),
    "a file": (lambda d, t: d / "adapter_config.json", [], ["not a directory"]),
    "no config": (lambda d, t: t, [], ["no adapter_config.json"]),
    "not lora": (
        _edited(lambda c: (c / "adapter_config.json").write_text('{"peft_type": "IA3"}')),
        [],
        ["adapter_config.json: peft_type is 'IA3', expected 'LORA'"],
    ),
    "malformed config": (
        _edited(lambda c: (c / "adapter_config.json").write_text("{oops")),
        [],
        ["adapter_config.json: malformed JSON"],
    ),
    "truncated weights": (
        _edited(_truncate),
        [],
        ["adapter_model.safetensors: not a readable safetensors file"],
    ),
    "garbage weights": (
        _edited(lambda c: (c / "adapter_model.safetensors").write_bytes(b"\x00" * 64)),
        [],
        ["adapter_model.safetensors: not a readable safetensors file"],
    ),
    "pickle only": (
        _edited(lambda c: (c / "adapter_model.safetensors").rename(c / "adapter_model.bin")),
        [],
        ["no adapter_model.safetensors", "adapter_model.bin is a pickle"],
    ),
    "energy zero": (lambda d, t: d, ["--energy", "0"], ["--energy", "(0, 1]"]),
    "energy above one": (lambda d, t: d, ["--energy", "1.5"], ["--energy", "got 1.5"]),
    "figure dir missing": (
        lambda d, t: d,
        ["--figure", "/nonexistent-dir/x.png"],
        ["--figure: cannot write /nonexistent-dir/x.png"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(planted_dir, tmp_path, capsys, case):
    make, extra, fragments = BAD[case]
    path = make(planted_dir, tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(path), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
    assert captured.err.startswith("rankwise inspect: error: ")
    for fragment in fragments:
        assert fragment in captured.err, captured.err


def test_report_shows_the_recommended_adapter(planted_dir, tmp_path):
    from rankwise.report.html import report_html

    from .test_report import CASES, parse

    run_dir = CASES["complete"](tmp_path)
    without = parse(report_html(run_dir))
    shutil.copytree(planted_dir, run_dir / "adapter")
    page = report_html(run_dir)
    assert parse(page).tags.count("img") == without.tags.count("img") + 1
    assert "Inside the recommended adapter" in page
    assert "2,048 trainable parameters instead of 4,096" in page
