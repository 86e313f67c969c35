"""bench/archive/truncate.py: the SVD truncation of a LoRA adapter is exact at r_max and optimal below.

The state dict of a PEFT adapter (r_max = 8, random A and B) on q_proj and up_proj of a
2-layer, hidden-64 Llama (rankwise.testing's tiny model: up_proj 64 -> 128), with PEFT's key
names, built from seeded tensors: no transformers or PEFT import, so the file runs in
about a second. No training, no files but a temporary adapter folder.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.archive.truncate import svd_truncate, truncate_state, write_truncation

R_MAX, ALPHA = 8, 8.0


@pytest.fixture(scope="module")
def state():
    """A saved LoRA state dict as PEFT names it, A and B both random (B != 0)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (64, 64), "mlp.up_proj": (64, 128)}  # (in, out)
    out = {}
    for layer in range(2):
        for module, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(R_MAX, fan_in, generator=gen)
            out[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, R_MAX, generator=gen) / 8
    return out


def delta(a, b, r):
    return (ALPHA / r) * (b.double() @ a.double())


def pairs(state):
    return [(k, k.replace(".lora_A.", ".lora_B.")) for k in state if ".lora_A." in k]


def test_truncation_to_r_max_reproduces_the_update(state):
    assert len(pairs(state)) == 4  # q_proj and up_proj in two layers
    for ka, kb in pairs(state):
        a, b = state[ka], state[kb]
        a2, b2 = svd_truncate(a, b, ALPHA, R_MAX)
        assert a2.shape == a.shape and b2.shape == b.shape
        want = delta(a, b, R_MAX)
        assert torch.allclose(delta(a2, b2, R_MAX), want, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("r", [1, 2, 4])
def test_truncation_is_the_best_rank_r_approximation(state, r):
    """Eckart-Young: ||ΔW - ΔW_r||_F = the norm of the singular values past r, and the
    result has rank r with shapes (r, in) and (out, r) at scale alpha / r."""
    for ka, kb in pairs(state):
        a, b = state[ka], state[kb]
        want = delta(a, b, R_MAX)
        s = torch.linalg.svdvals(want)
        a2, b2 = svd_truncate(a, b, ALPHA, r)
        assert a2.shape == (r, a.shape[1]) and b2.shape == (b.shape[0], r)
        got = delta(a2, b2, r)
        err = torch.linalg.matrix_norm(want - got)
        tail = s[r:].norm()
        assert abs(float(err - tail)) <= 1e-5 * float(s[0])
        # and its own spectrum is the top r of the update's
        assert torch.allclose(torch.linalg.svdvals(got)[:r], s[:r], rtol=1e-5)


def test_state_and_folder_keep_keys_and_alpha(state, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    src.mkdir()
    save_file(state, str(src / "adapter_model.safetensors"))
    config = {"r": R_MAX, "lora_alpha": ALPHA, "peft_type": "LORA", "use_rslora": False}
    (src / "adapter_config.json").write_text(json.dumps(config))
    out = write_truncation(src, tmp_path / "r2", 2)
    got = load_file(str(out / "adapter_model.safetensors"))
    assert set(got) == set(state)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 2
    direct = truncate_state(state, ALPHA, 2)
    for k in state:
        assert torch.equal(got[k], direct[k])
