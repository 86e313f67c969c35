"""rankwise.estimate: exact counts against PEFT, file sizes, and the memory model's shape."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from rankwise.analysis.estimate import RankEstimate, calibrate, estimate, format_table
from rankwise.analysis.params import adapter_file_bytes, lora_param_count, resolve_target_modules
from rankwise.testing import save_tiny_model, tiny_model

TARGETS = {
    "llama": [None, "all-linear", ["q_proj", "k_proj", "down_proj"]],
    "gpt2": [None, "all-linear", ["c_attn", "c_proj"], ["c_fc"]],
}
CASES = [
    (arch, targets, bias)
    for arch, options in TARGETS.items()
    for targets in options
    for bias in ("none", "all", "lora_only")
]


def _peft(model, targets, rank, bias):
    peft_targets = "all-linear" if targets == ["all-linear"] else targets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's Conv1D: "setting fan_in_fan_out to True"
        return get_peft_model(model, LoraConfig(r=rank, target_modules=peft_targets, bias=bias))


@pytest.mark.parametrize(("arch", "targets", "bias"), CASES, ids=str)
def test_trainable_params_and_file_size_match_peft(arch, targets, bias, tmp_path):
    for rank in (1, 8):
        expected_count = lora_param_count(tiny_model(arch), targets, rank, bias)
        expected_size = adapter_file_bytes(tiny_model(arch), targets, rank, bias)
        peft_model = _peft(tiny_model(arch), targets, rank, bias)
        assert expected_count == peft_model.get_nb_trainable_parameters()[0]
        peft_model.save_pretrained(tmp_path / str(rank))
        assert expected_size == (tmp_path / str(rank) / "adapter_model.safetensors").stat().st_size


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_resolved_targets_are_the_modules_peft_wraps(arch):
    for targets in TARGETS[arch]:
        names = resolve_target_modules(tiny_model(arch), targets)
        peft_model = _peft(tiny_model(arch), targets, 4, "none")
        wrapped = [
            n.removeprefix("base_model.model.")
            for n, m in peft_model.named_modules()
            if isinstance(m, BaseTunerLayer)
        ]
        assert names == wrapped


def test_all_linear_leaves_out_the_output_head():
    names = resolve_target_modules(tiny_model("gpt2"), "all-linear")
    assert "lm_head" not in names and len(names) == 2 * 4  # 2 layers x c_attn, c_proj, c_fc, c_proj


def test_embedding_target_counts_like_peft():
    count = lora_param_count(tiny_model("llama"), ["embed_tokens", "q_proj"], 4, "none")
    assert (
        count
        == _peft(
            tiny_model("llama"), ["embed_tokens", "q_proj"], 4, "none"
        ).get_nb_trainable_parameters()[0]
    )


def test_unknown_target_is_an_error():
    with pytest.raises(ValueError, match="matches no module"):
        resolve_target_modules(tiny_model("llama"), ["nope"])


def test_estimate_from_a_directory_reads_only_the_config(tmp_path, monkeypatch):
    path = save_tiny_model(tmp_path / "m", "llama")
    from transformers import AutoModelForCausalLM

    def refuse(*a, **k):
        raise AssertionError("estimate() must not load weights")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    t0 = time.perf_counter()
    from_dir = estimate(str(path), ranks=(2, 8), baseline_bytes=0)
    assert time.perf_counter() - t0 < 5
    loaded = estimate(tiny_model("llama"), ranks=(2, 8), baseline_bytes=0)
    assert from_dir == loaded


def test_estimate_leaves_a_loaded_model_untouched():
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate(model, ranks=(4,), target_modules="all-linear", baseline_bytes=0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_breakdown_adds_up():
    (row,) = estimate(tiny_model("llama"), ranks=(4,), baseline_bytes=1000)
    parts = row.baseline_bytes + row.weights_bytes + row.adapter_state_bytes + row.activation_bytes
    assert row.peak_memory_bytes == parts
    assert row.adapter_state_bytes == 16 * row.trainable_params  # fp32 x (param, grad, 2 Adam)
    assert row.weights_bytes == 4 * sum(p.numel() for p in tiny_model("llama").parameters())
    assert RankEstimate(**row.to_dict()) == row


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_memory_grows_with_rank_and_sequence_and_checkpointing_saves(arch):
    model = tiny_model(arch)
    rows = estimate(model, ranks=(1, 4, 16, 64), target_modules="all-linear", baseline_bytes=0)
    peaks = [r.peak_memory_bytes for r in rows]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    short, long = (estimate(model, ranks=(8,), seq_len=n, baseline_bytes=0)[0] for n in (64, 256))
    assert long.activation_bytes > short.activation_bytes
    assert long.trainable_params == short.trainable_params
    plain, ckpt = (
        estimate(model, ranks=(8,), gradient_checkpointing=g, baseline_bytes=0)[0]
        for g in (False, True)
    )
    assert ckpt.activation_bytes < plain.activation_bytes


def test_bf16_halves_weights():
    model = tiny_model("llama")
    fp32, bf16 = (
        estimate(model, ranks=(4,), dtype=d, baseline_bytes=0)[0] for d in ("float32", "bfloat16")
    )
    assert 2 * bf16.weights_bytes == fp32.weights_bytes
    assert bf16.adapter_state_bytes == fp32.adapter_state_bytes  # adapters stay fp32


def test_calibrate_times_steps_and_leaves_the_model_as_it_was():
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timing = calibrate(model, ranks=(1, 16), batch_size=2, seq_len=16, steps=1)
    assert all(s > 0 for _, s in timing.samples)
    rows = estimate(model, ranks=(1, 4, 16), baseline_bytes=0, timing=timing, max_steps=10)
    assert all(
        r.step_seconds > 0 and r.trial_seconds == pytest.approx(10 * r.step_seconds) for r in rows
    )
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "s/step" in format_table(rows)


def test_format_table_lists_every_rank():
    rows = estimate(tiny_model("gpt2"), ranks=(1, 256), baseline_bytes=0)
    text = format_table(rows)
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["rank", "trainable"] and "s/step" not in text
    assert lines[2].split()[0] == "1" and lines[3].split()[0] == "256"


@pytest.mark.parametrize(
    ("arch", "targets"),
    [("llama", ["q_proj", "k_proj", "down_proj"]), ("llama", ["embed_tokens", "q_proj"]),
     ("gpt2", ["c_attn", "c_proj"])],
    ids=str,
)  # fmt: skip
def test_dora_counts_and_file_size_match_peft(arch, targets, tmp_path):
    """DoRA: one trained magnitude per output feature of every adapted module, saved as its
    lora_magnitude_vector; the search's budgets see them (--max-trainable-params, size)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            tiny_model(arch), LoraConfig(r=4, target_modules=targets, use_dora=True)
        )
    peft_model.save_pretrained(tmp_path)
    [e] = estimate(tiny_model(arch), ranks=[4], target_modules=targets, use_dora=True,
                   baseline_bytes=0)  # fmt: skip
    assert e.trainable_params == peft_model.get_nb_trainable_parameters()[0]
    assert e.trainable_params > lora_param_count(tiny_model(arch), targets, 4)
    if "embed_tokens" not in targets:  # PEFT then also saves the whole embedding matrix
        assert e.adapter_bytes == (tmp_path / "adapter_model.safetensors").stat().st_size


def _held_for_backward(model, batch: int, seq: int = 16) -> int:
    """Bytes of the tensors autograd still holds for backward after one forward pass."""
    import gc
    import weakref

    class Box:
        def __init__(self, t):
            self.t = t

    boxes = []

    def pack(t):
        boxes.append(weakref.ref(box := Box(t)))
        return box

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(4, 100, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda b: b.t):
        out = model(input_ids=ids).logits  # noqa: F841  (keeps the graph alive)
    gc.collect()
    held = {}
    for ref in boxes:
        if (box := ref()) is not None:
            storage = box.t.untyped_storage()
            if storage.data_ptr() not in params:
                held[storage.data_ptr()] = storage.nbytes()
    return sum(held.values())


def test_dora_activations_are_what_autograd_keeps():
    """The memory model's DoRA term, 2 x out elements per token per adapted module (the base
    and LoRA outputs it rescales), against what autograd really holds for backward."""
    from rankwise.analysis.memory import _lora_layer_elements

    targets = ["q_proj", "up_proj", "down_proj"]

    def per_token(use_dora: bool) -> float:
        m = get_peft_model(
            tiny_model("llama"), LoraConfig(r=4, target_modules=targets, use_dora=use_dora)
        ).train()
        return (_held_for_backward(m, 4) - _held_for_backward(m, 2)) / (2 * 16 * 4)  # fp32

    names = resolve_target_modules(tiny_model("llama"), targets)
    model = tiny_model("llama")
    predicted = _lora_layer_elements(model, names, 4, True) - _lora_layer_elements(model, names, 4)
    assert per_token(True) - per_token(False) == predicted > 0
