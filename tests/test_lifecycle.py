"""The one trial lifecycle: the base model restored bit for bit whatever the adapter made
trainable or its init rewrote (and however the trial ended), with its train/eval modes and
gradients; token-weighted gradient accumulation; and numerical parity with a plain
PyTorch + PEFT loop written here."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from rankwise.io.data import TokenData
from rankwise.records import LoraSpec, TrainSpec, TrialSpec
from rankwise.testing import tiny_model
from rankwise.training.adapter import TrialContext
from rankwise.training.hooks import Hooks
from rankwise.training.lifecycle import run_lifecycle
from rankwise.training.trial import run_trial


def digest(model) -> str:
    """Names, values, requires_grad and gradient of every base parameter and buffer, and
    the type and train/eval mode of every module."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        h.update(f"{name}:{getattr(t, 'requires_grad', False)}".encode())
        h.update(t.detach().cpu().numpy().tobytes())
        grad = getattr(t, "grad", None)
        h.update(b"no grad" if grad is None else grad.detach().cpu().numpy().tobytes())
    h.update(repr([(type(m).__name__, m.training) for m in model.modules()]).encode())
    return h.hexdigest()


def masked_blocks(n: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt/completion-like blocks: a random-length prompt is masked (-100) in each
    block, so micro-batches hold different numbers of loss tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 100, (n, seq), generator=g)
    labels = ids.clone()
    for i in range(n):
        labels[i, : int(torch.randint(1, seq - 2, (1,), generator=g))] = -100
    return ids, labels


def context(model) -> TrialContext:
    tr, trl = masked_blocks(32, 16, 0)
    va, val = masked_blocks(8, 16, 1)
    return TrialContext(model.requires_grad_(False), None, "cpu", TokenData(tr, trl, va, val, {}))


MODELS = {
    "gpt2": lambda: tiny_model("gpt2"),  # Conv1D layers with biases
    "llama-bias": lambda: tiny_model("llama", attention_bias=True, mlp_bias=True),
    "llama": lambda: tiny_model("llama"),
    "qwen3-moe": lambda: tiny_model("qwen3_moe"),  # fused experts: PEFT's ParamWrapper
}
TARGETS = {
    "gpt2": ["c_attn", "c_fc"],
    "llama-bias": ["q_proj", "up_proj"],
    "llama": ["q_proj"],
    "qwen3-moe": ["q_proj"],
}
PARAMETERS = {"qwen3-moe": ["experts.gate_up_proj", "experts.down_proj"]}


def spec(arch, rank=4, bias="none", key="t", **train) -> TrialSpec:
    return TrialSpec(
        key=key,
        rank=rank,
        seed=0,
        lora=LoraSpec(
            r=rank,
            lora_alpha=8,
            target_modules=TARGETS[arch],
            bias=bias,
            target_parameters=PARAMETERS.get(arch),
        ),
        train=TrainSpec(
            **{"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, "eval_every": 2}
            | train
        ),
        model={},
        data_dir="",
    )


class FailAt(Hooks):
    """Raises in the middle of training: at step ``step``, after its backward pass (every
    trainable parameter holds a gradient) and after earlier optimizer steps moved them all."""

    def __init__(self, step: int):
        self.at, self.step_no = step, 0

    def step(self, peft_model, step):
        self.step_no = step
        return super().step(peft_model, step)

    def optimizer_step(self, peft_model, optimizer):
        if self.step_no == self.at:
            assert any(p.grad is not None for p in peft_model.parameters())
            raise RuntimeError("boom")
        super().optimizer_step(peft_model, optimizer)


@pytest.mark.parametrize("arch", sorted(MODELS))
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_base_is_bit_identical_after_trials(arch, bias):
    ctx = context(MODELS[arch]())
    before = digest(ctx.model)
    first = run_trial(spec(arch, 2, bias), ctx)
    assert first.ok and digest(ctx.model) == before
    failed = run_lifecycle(spec(arch, 4, bias), ctx, FailAt(3))[0]
    assert failed.status == "failed" and "boom" in failed.reason
    assert digest(ctx.model) == before
    # A trial run alone scores what it scores after any number of other trials.
    alone = run_trial(spec(arch, 2, bias), context(MODELS[arch]()))
    assert run_trial(spec(arch, 2, bias), ctx).best_val_loss == alone.best_val_loss
    assert first.best_val_loss == alone.best_val_loss


@pytest.mark.parametrize("arch", ["gpt2", "llama", "llama-bias"])  # DoRA wraps modules only
def test_base_is_bit_identical_after_dora_trials(arch):
    """DoRA adds a magnitude vector per adapted module and builds its weight norm from the
    base weight; after a DoRA trial, complete or failed, the base is as it was."""

    def dora(rank: int, use_dora: bool = True) -> TrialSpec:
        s = spec(arch, rank, "all" if arch == "llama-bias" else "none")
        return s.replace(lora=s.lora.replace(use_dora=use_dora))

    ctx = context(MODELS[arch]())
    before = digest(ctx.model)
    done, plain = run_trial(dora(2), ctx), run_trial(dora(2, use_dora=False), ctx)
    assert done.ok and done.trainable_params > plain.trainable_params  # the magnitudes trained
    assert digest(ctx.model) == before
    failed = run_lifecycle(dora(4), ctx, FailAt(3))[0]
    assert failed.status == "failed" and "boom" in failed.reason
    assert digest(ctx.model) == before


def test_the_callers_modes_and_gradients_survive_a_failed_trial():
    """A library user's model keeps its train/eval modes (mixed here) and its gradients, also
    when a trial fails after a backward pass that gave trainable base biases gradients."""
    ctx = context(MODELS["llama-bias"]())
    ctx.model.train()
    ctx.model.model.layers[0].eval()
    weight = ctx.model.model.layers[1].mlp.up_proj.weight
    weight.grad = torch.ones_like(weight)
    grad, before = weight.grad, digest(ctx.model)
    failed = run_lifecycle(spec("llama-bias", 2, "all"), ctx, FailAt(3))[0]
    assert failed.status == "failed" and "boom" in failed.reason
    assert digest(ctx.model) == before and weight.grad is grad


def peek_at(param: torch.Tensor, seen: dict) -> Hooks:
    """Hooks that note, at each evaluation, whether ``param`` differs from its value now."""
    start = param.detach().clone()

    class Peek(Hooks):
        def evaluate(self, peft_model, run, c):
            seen["changed"] = not torch.equal(param, start)
            super().evaluate(peft_model, run, c)

    return Peek()


def with_init(s: TrialSpec, init) -> TrialSpec:
    return s.replace(lora=s.lora.replace(init_lora_weights=init))


@pytest.mark.parametrize(
    "arch,init,bias",
    [("gpt2", "pissa", "all"), ("llama", "pissa_niter_2", "none"), ("llama-bias", "olora", "all")],
)
def test_inits_that_rewrite_the_base_are_undone(arch, init, bias):
    """PiSSA and OLoRA subtract their initial B·A from the wrapped base weights (in place,
    for OLoRA in fp32); after the trial, complete or failed, the base is bit-identical."""
    ctx = context(MODELS[arch]())
    before, seen = digest(ctx.model), {}
    wrapped = dict(ctx.model.named_parameters())[
        "transformer.h.0.attn.c_attn.weight"
        if arch == "gpt2"
        else "model.layers.0.self_attn.q_proj.weight"
    ]
    done = run_lifecycle(with_init(spec(arch, 2, bias), init), ctx, peek_at(wrapped, seen))[0]
    assert done.ok, done.reason
    assert seen["changed"] and digest(ctx.model) == before  # rewritten during, restored after
    failed = run_lifecycle(with_init(spec(arch, 4, bias), init), ctx, FailAt(3))[0]
    assert failed.status == "failed" and digest(ctx.model) == before


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal", "mica"])
def test_inits_known_to_leave_the_base_alone_do(init):
    """The inits that are not snapshotted (PURE_INITS) really leave the base weights alone,
    even in the middle of a trial."""
    from rankwise.training.adapter import PURE_INITS

    assert init in PURE_INITS
    ctx = context(MODELS["llama"]())
    before, seen = digest(ctx.model), {}
    wrapped = ctx.model.model.layers[0].self_attn.q_proj.weight
    r = run_lifecycle(with_init(spec("llama"), init), ctx, peek_at(wrapped, seen))[0]
    assert r.ok, r.reason
    assert not seen["changed"] and digest(ctx.model) == before


@pytest.mark.parametrize("init", ["loftq", "corda", "lora_ga"])
def test_inits_that_need_a_preparation_pass_are_refused(init):
    from rankwise.errors import ConfigError

    ctx = context(MODELS["llama"]())
    before = digest(ctx.model)
    with pytest.raises(ConfigError, match=f"init_lora_weights='{init}'.*accepted: True") as err:
        run_trial(with_init(spec("llama"), init), ctx)
    assert "\n" not in str(err.value) and "'pissa'" in str(err.value)
    assert digest(ctx.model) == before


def test_trainable_biases_do_move_during_training():
    """The check above can fail: under bias='all' training really changes base biases."""
    ctx = context(MODELS["gpt2"]())
    bias = ctx.model.transformer.h[0].attn.c_attn.bias
    before = bias.detach().clone()
    seen = {}

    class Peek(Hooks):
        def evaluate(self, peft_model, run, c):
            seen["moved"] = not torch.equal(bias, before)
            super().evaluate(peft_model, run, c)

    run_lifecycle(spec("gpt2", 2, "all"), ctx, Peek())
    assert seen["moved"] and torch.equal(bias, before)


def test_injection_that_fails_leaves_the_base_alone():
    ctx = context(MODELS["llama"]())
    before = digest(ctx.model)
    bad = spec("llama").replace(lora=LoraSpec(r=4, lora_alpha=8, target_modules=["nope"]))
    r = run_trial(bad, ctx)
    assert r.status == "failed" and "nope" in r.reason
    assert digest(ctx.model) == before and not hasattr(ctx.model, "peft_config")


def test_modules_to_save_are_restored():
    """PEFT swaps a trained copy in for a modules_to_save module on unload; the lifecycle
    puts the original back."""
    from rankwise.training import adapter

    ctx = context(MODELS["llama"]())
    before = digest(ctx.model)
    original = adapter.lora_config

    def with_head(s):
        cfg = original(s)
        cfg.modules_to_save = ["lm_head"]
        return cfg

    adapter.lora_config = with_head
    try:
        r = run_trial(spec("llama"), ctx)
        failed = run_lifecycle(spec("llama"), ctx, FailAt(3))[0]
    finally:
        adapter.lora_config = original
    assert r.ok and r.trainable_params > 128 * 64  # the head copy trained
    assert failed.status == "failed" and digest(ctx.model) == before


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_grad_accum_is_token_weighted(arch):
    """grad_accum=2 x batch 4 is the same optimizer step as batch 8 on masked data (GPT-2's
    dropout off: it would draw different masks for one batch of 8 than for two of 4)."""
    no_dropout = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    ctx = context(tiny_model(arch, **(no_dropout if arch == "gpt2" else {})))
    masks = ctx.data.train_labels[:, 1:] != -100
    assert len(set(masks.sum(1).tolist())) > 3  # micro-batches really differ in loss tokens
    whole = run_trial(spec(arch, batch_size=8, grad_accum=1), ctx)
    split = run_trial(spec(arch, batch_size=4, grad_accum=2), ctx)
    for (s1, a), (s2, b) in zip(whole.train_curve, split.train_curve, strict=True):
        assert s1 == s2 and a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert whole.best_val_loss == pytest.approx(split.best_val_loss, rel=1e-5)


def test_numerical_parity_with_a_plain_peft_loop():
    """The trial against a loop written here from PyTorch and PEFT alone: same blocks, order,
    schedule, clipping and seed give the same per-step losses and validation loss."""
    from peft import LoraConfig, get_peft_model

    s = spec("llama", rank=4, max_steps=6, eval_every=6, warmup_steps=2, batch_size=4)
    mine = run_trial(s, context(MODELS["llama"]()))

    ctx = context(MODELS["llama"]())
    d, tc = ctx.data, s.train
    torch.manual_seed(s.seed)
    model = get_peft_model(
        ctx.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM")
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(tc.seed)
    order: list[int] = []
    losses = []
    model.train()
    for step in range(1, tc.max_steps + 1):
        while len(order) < tc.batch_size:
            order += torch.randperm(d.train_ids.shape[0], generator=g).tolist()
        idx, order = torch.tensor(order[: tc.batch_size]), order[tc.batch_size :]
        lr_factor = (
            step / (tc.warmup_steps + 1)
            if step - 1 < tc.warmup_steps
            else (tc.max_steps - step + 1) / (tc.max_steps - tc.warmup_steps)
        )
        for group in opt.param_groups:
            group["lr"] = tc.lr * lr_factor
        out = model(input_ids=d.train_ids[idx], labels=d.train_labels[idx])  # HF's own loss
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss))
    model.eval()
    with torch.no_grad():
        out = model(input_ids=d.val_ids, labels=d.val_labels)
    n = int((d.val_labels[:, 1:] != -100).sum())
    # HF's loss is the token mean over the whole batch: the same token weighting.
    val = float(out.loss)
    assert [loss for _, loss in mine.train_curve] == pytest.approx(losses, rel=1e-5)
    assert mine.best_val_loss == pytest.approx(val, rel=1e-6)
    assert mine.best_step == tc.max_steps and n > 0 and math.isfinite(val)


def test_bf16_autocast_keeps_the_losses_and_fp32_parameters():
    """--dtype auto's bf16 autocast: the same losses to bf16 precision; the base weights,
    LoRA weights and optimizer state stay fp32."""
    from rankwise.io.models import pick_autocast

    assert pick_autocast("float32", "cpu") is None and pick_autocast("bfloat16", "cpu") is None
    fp32 = run_trial(spec("llama"), context(MODELS["llama"]()))
    ctx = context(MODELS["llama"]())
    seen = {}

    class Peek(Hooks):
        def evaluate(self, peft_model, run, c):
            seen["dtypes"] = {p.dtype for p in peft_model.parameters()}
            super().evaluate(peft_model, run, c)

    bf16 = run_lifecycle(spec("llama", autocast="bfloat16"), ctx, Peek())[0]
    assert seen["dtypes"] == {torch.float32}
    assert bf16.best_val_loss == pytest.approx(fp32.best_val_loss, rel=1e-2)
    assert bf16.best_val_loss != fp32.best_val_loss  # it did run in bf16
    for (_, a), (_, b) in zip(fp32.train_curve, bf16.train_curve, strict=True):
        assert a == pytest.approx(b, rel=2e-2)
