"""Pattern checks: PEFT's silent pass over unmatched rank_pattern keys (peft#3582) is refused."""

from __future__ import annotations

import pytest

from rankwise.errors import ConfigError
from rankwise.testing import tiny_model
from rankwise.training.patterns import pattern_value, verify_ranks


def test_pattern_keys_match_as_peft_matches_them():
    pattern = {"q_proj": 2, r"layers\.1\..*_proj": 3, "model.layers.0.mlp.up_proj": 5}
    assert pattern_value(pattern, "model.layers.0.self_attn.q_proj", 8) == 2
    assert pattern_value(pattern, "model.layers.1.mlp.down_proj", 8) == 3
    assert pattern_value(pattern, "model.layers.0.mlp.up_proj", 8) == 5
    assert pattern_value(pattern, "model.layers.0.mlp.down_proj", 8) == 8
    assert pattern_value(pattern, "model.layers.0.self_attn.q_proj_x", 8) == 8  # suffix of a part
    assert pattern_value({}, "anything", 8) == 8


def _peft(lora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **lora)
    return get_peft_model(tiny_model("llama"), config), config


def test_verify_ranks_passes_a_matching_pattern():
    model, config = _peft({"rank_pattern": {"layers.1.self_attn.v_proj": 2}})
    ranks = verify_ranks(model, config)
    assert ranks["model.layers.1.self_attn.v_proj"] == 2
    assert sorted(set(ranks.values())) == [2, 4] and len(ranks) == 4
    assert verify_ranks(model.base_model, config) == ranks  # the tuner alone works too


@pytest.mark.parametrize("attr", ["rank_pattern", "alpha_pattern"])
def test_verify_ranks_refuses_a_key_that_matches_nothing(attr):
    model, config = _peft({attr: {"q_proj": 2, "self_attn.wq": 2}})
    with pytest.raises(ConfigError, match=rf"{attr} key 'self_attn.wq' matched no LoRA module"):
        verify_ranks(model, config)


def test_verify_ranks_refuses_a_module_without_its_rank():
    from peft import LoraConfig

    model, _ = _peft({})
    asks = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    asks.rank_pattern = {"model.layers.0.self_attn.q_proj": 2}  # not what the model was built with
    with pytest.raises(
        ConfigError,
        match=r"model.layers.0.self_attn.q_proj got r=4, but rank_pattern key '.*' asks 2",
    ):
        verify_ranks(model, asks)
