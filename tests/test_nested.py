"""Nested-rank training: truncations equal plain PEFT adapters, inactive components stay
put, a run gives one usable record and adapter per rank, and the knee matches a grid."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rankwise.io.data import TokenData
from rankwise.records import TrialSpec
from rankwise.testing import tiny_model
from rankwise.training.adapter import TrialContext, attach_adapter
from rankwise.training.evaluate import evaluate
from rankwise.training.nested import (
    RankSampler,
    active_rank,
    lora_alpha_for,
    nested_key,
    run_nested,
    save_truncated,
    with_nested,
)
from rankwise.training.trial import run_trial

from .test_lifecycle import digest

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
ALPHA = 8.0
POLICIES = {  # scale_for(r) of each alpha policy, as rankwise.config.LoraSettings.scaling
    "fixed": (False, lambda r: ALPHA / r),
    "rslora": (True, lambda r: ALPHA / math.sqrt(r)),
    "ratio": (False, lambda r: 2.0),  # lora_alpha = 2r
}


def make_spec(
    tmp_path,
    r_max: int,
    steps: int = 6,
    use_rslora: bool = False,
    lr: float = 3e-3,
    batch_size: int = 4,
    eval_every: int = 3,
    lora_init=True,
) -> TrialSpec:
    lora = {
        "r": r_max,
        "lora_alpha": ALPHA,
        "target_modules": TARGETS,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": use_rslora,
    }
    if lora_init is not True:
        lora["init_lora_weights"] = lora_init
    train = {
        "max_steps": steps,
        "batch_size": batch_size,
        "grad_accum": 1,
        "lr": lr,
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "eval_every": eval_every,
        "eval_batches": None,
        "seed": 0,
        "max_trial_time": None,
    }
    return TrialSpec(
        key=f"r{r_max}-s0",
        rank=r_max,
        seed=0,
        lora=lora,
        train=train,
        model={},
        data_dir="",
        adapter_dir=str(tmp_path / "trials" / f"r{r_max}-s0" / "adapter"),
    )


def random_ctx(model, n_train: int = 16, n_val: int = 8, seq: int = 16) -> TrialContext:
    g = torch.Generator().manual_seed(0)
    tr = torch.randint(4, 100, (n_train, seq), generator=g)
    va = torch.randint(4, 100, (n_val, seq), generator=g)
    return TrialContext(model, None, "cpu", TokenData(tr, tr.clone(), va, va.clone(), {}))


IDS = torch.tensor([[5, 17, 42, 9, 77, 3, 61, 20]])


@pytest.mark.parametrize("policy", sorted(POLICIES))
@pytest.mark.parametrize("b", [1, 3])
def test_truncation_equals_plain_rank_b_adapter(tmp_path, policy, b):
    from peft import LoraConfig, get_peft_model

    use_rslora, scale_for = POLICIES[policy]
    spec = make_spec(tmp_path, 4, use_rslora=use_rslora, lora_init=False)  # B random, not 0
    nested = attach_adapter(tiny_model(), spec)
    with torch.no_grad(), active_rank(nested, b, scale_for(b)):
        got = nested(input_ids=IDS).logits
    # An independent, plain rank-b PEFT adapter holding the first b components.
    config = LoraConfig(
        r=b,
        lora_alpha=lora_alpha_for(scale_for(b), b, use_rslora),
        target_modules=TARGETS,
        use_rslora=use_rslora,
        task_type="CAUSAL_LM",
    )
    plain = get_peft_model(tiny_model(), config)
    big = dict(nested.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_A" in name:
                p.copy_(big[name][:b])
            elif "lora_B" in name:
                p.copy_(big[name][:, :b])
        want = plain(input_ids=IDS).logits
    assert plain.base_model.model.model.layers[0].self_attn.q_proj.scaling[
        "default"
    ] == pytest.approx(scale_for(b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The rank-b forward really differs from the full adapter's.
    with torch.no_grad():
        assert not torch.allclose(got, nested(input_ids=IDS).logits, atol=1e-4)


def test_active_rank_restores_the_layers(tmp_path):
    model = attach_adapter(tiny_model(), make_spec(tmp_path, 4, lora_init=False))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    before = model(input_ids=IDS).logits.detach()
    with active_rank(model, 2, 123.0):
        assert q.scaling["default"] == 123.0
    assert q.scaling["default"] == ALPHA / 4
    assert not q.lora_A["default"]._forward_hooks
    torch.testing.assert_close(model(input_ids=IDS).logits.detach(), before)
    with pytest.raises(ValueError, match="outside 1..4"):
        with active_rank(model, 5, 1.0):
            pass


def test_inactive_components_get_zero_gradients(tmp_path):
    model = attach_adapter(tiny_model(), make_spec(tmp_path, 8, lora_init=False))
    b = 3
    with active_rank(model, b, ALPHA / b):
        model(input_ids=IDS, labels=IDS).loss.backward()
    for name, p in model.named_parameters():
        if "lora_A" in name:
            assert p.grad[b:].abs().max() == 0 and p.grad[:b].abs().max() > 0, name
        elif "lora_B" in name:
            assert p.grad[:, b:].abs().max() == 0 and p.grad[:, :b].abs().max() > 0, name


def test_rank_sampler():
    draw = RankSampler([1, 2, 4, 8], "uniform-list", seed=3)
    seq = [draw() for _ in range(400)]
    assert set(seq) == {1, 2, 4, 8} and all(60 < seq.count(r) < 140 for r in (1, 2, 4, 8))
    again = RankSampler([1, 2, 4, 8], "uniform-list", seed=3)
    assert [again() for _ in range(400)] == seq
    assert RankSampler([2, 4], "uniform-r").probabilities == {2: 0.5, 4: 0.5}
    with pytest.raises(ValueError, match="distribution"):
        RankSampler([1, 2], "log")


def test_run_nested_records_adapters_and_base(tmp_path):
    from peft import PeftModel

    ranks = [1, 2, 4]
    model = tiny_model()
    ctx = random_ctx(model)
    base_state, base_digest = {k: v.clone() for k, v in model.state_dict().items()}, digest(model)
    spec = make_spec(tmp_path, 4, steps=6, eval_every=3)
    scale_for = POLICIES["fixed"][1]
    results = run_nested(with_nested(spec, ranks, scale_for), ctx)

    assert [r.key for r in results] == [nested_key(r, 0) for r in ranks]
    assert [r.rank for r in results] == ranks
    after = model.state_dict()
    assert after.keys() == base_state.keys()
    assert all(torch.equal(after[k], v) for k, v in base_state.items())
    assert digest(model) == base_digest  # train/eval modes and gradients too
    for res in results:
        assert res.ok, res.reason
        assert math.isfinite(res.best_val_loss) and res.steps == 6
        assert [s for s, _ in res.val_curve] == [3, 6]
        assert res.extra["nested"] and res.extra["r_max"] == 4
        assert res.lora_alpha == ALPHA  # fixed policy: alpha stays, r changes
    assert sum(r.extra["steps_at_rank"] for r in results) == 6
    assert [r.train_tokens for r in results] == [0, 0, 6 * 4 * 16]  # the total on r_max
    assert sum(r.wall_seconds for r in results) == pytest.approx(
        results[0].extra["shared_wall_seconds"]
    )
    per_layer = 64 + 64 + 64 + 64 + 64 + 128 + 128 + 64  # in+out of q, v, up, down
    assert [r.trainable_params for r in results] == [2 * per_layer * r for r in ranks]

    for res in results:
        folder = tmp_path / "trials" / res.key / "adapter"
        loaded = PeftModel.from_pretrained(copy.deepcopy(model), folder)
        assert loaded.peft_config["default"].r == res.rank
        assert (
            loaded.get_nb_trainable_parameters()[1] - sum(p.numel() for p in model.parameters())
            == res.trainable_params
        )
        loss = evaluate(loaded, ctx.data.val_ids, ctx.data.val_labels, 4, "cpu")
        assert loss == pytest.approx(res.best_val_loss, abs=1e-4)


def test_save_truncated_from_a_model_matches_active_rank(tmp_path):
    from peft import PeftModel

    _, scale_for = POLICIES["rslora"]
    model = attach_adapter(tiny_model(), make_spec(tmp_path, 4, use_rslora=True, lora_init=False))
    with torch.no_grad(), active_rank(model, 2, scale_for(2)):
        want = model(input_ids=IDS).logits
    save_truncated(model, 2, tmp_path / "r2", scale_for(2))
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "r2")
    assert loaded.peft_config["default"].lora_alpha == pytest.approx(ALPHA)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_failures_and_bad_arguments(tmp_path):
    model = tiny_model()
    ctx = random_ctx(model)
    spec = make_spec(tmp_path, 4, lr=float("nan"), steps=2)
    results = run_nested(with_nested(spec, [1, 4], POLICIES["fixed"][1]), ctx)
    assert [r.status for r in results] == ["failed", "failed"]
    with pytest.raises(ValueError, match="largest rank"):
        run_nested(with_nested(make_spec(tmp_path, 4), [1, 8], POLICIES["fixed"][1]), ctx)
    with pytest.raises(ValueError, match="distribution"):
        run_nested(with_nested(make_spec(tmp_path, 4), [1, 4], POLICIES["fixed"][1], "normal"), ctx)


def test_one_rank_is_run_trial(tmp_path):
    """With a single rank the nested loop is run_trial's loop: same batches, same curve."""
    model = tiny_model()
    ctx = random_ctx(model)
    spec = make_spec(tmp_path, 2, steps=4, eval_every=2)
    plain = run_trial(spec, ctx)
    (nested,) = run_nested(with_nested(spec, [2], POLICIES["fixed"][1]), ctx)
    for got, want in ((nested.train_curve, plain.train_curve), (nested.val_curve, plain.val_curve)):
        assert [s for s, _ in got] == [s for s, _ in want]
        assert [v for _, v in got] == pytest.approx([v for _, v in want], abs=1e-6)
    assert nested.trainable_params == plain.trainable_params


def test_early_stopping_holds_under_nested_training(tmp_path, tiny_ctx):
    """--early-stopping-patience is not ignored under nested training: the run stops at the
    first evaluation where no truncation has improved for `patience` evaluations. Not at the
    first stalled rank: at step 6 ranks 2 and 4 had spent their patience (best at step 2)
    while rank 1 had just improved (step 4), and the run went on to step 8."""
    from rankwise.training.lifecycle import _patience_spent

    spec = make_spec(tmp_path, 4, steps=40, lr=1e-2, eval_every=2)
    spec = spec.replace(train=spec.train.replace(early_stopping_patience=2))
    results = run_nested(with_nested(spec, [1, 2, 4], POLICIES["fixed"][1]), tiny_ctx)
    tc = spec.train
    assert all(r.ok and r.early_stopped for r in results)
    assert {r.steps for r in results} == {8} and {r.val_curve[-1][0] for r in results} == {8}
    curves = {r.rank: r.val_curve for r in results}
    assert all(_patience_spent(c, tc) for c in curves.values())  # nothing improving: stop
    at_6 = {rank: _patience_spent(c[:3], tc) for rank, c in curves.items()}
    assert at_6 == {1: False, 2: True, 4: True}  # rank 1 still improving: go on
    assert [r.best_step for r in results] == [4, 2, 2]
    for r in results:  # each rank's adapter is its own best checkpoint
        assert (tmp_path / "trials" / r.key / "adapter" / "adapter_model.safetensors").exists()


def test_keys_and_folders_follow_the_study(tmp_path):
    from dataclasses import replace

    from rankwise.training.nested import nested_adapter_dir

    spec = make_spec(tmp_path, 4)
    assert nested_adapter_dir(spec, 2) == tmp_path / "trials" / "nested-r2-s0" / "adapter"
    grouped = replace(spec, group="g", adapter_dir=str(tmp_path / "trials" / "g_r4-s0" / "adapter"))
    assert nested_key(2, 0, "g") == "g/nested-r2-s0"
    assert nested_adapter_dir(grouped, 2) == tmp_path / "trials" / "g_nested-r2-s0" / "adapter"
    assert nested_adapter_dir(replace(spec, adapter_dir=None), 2) is None


def test_optimizer_step_leaves_inactive_components_alone(tmp_path):
    """AdamW's momentum would move components that took no part in a step; they are held."""
    from rankwise.training.nested import _hold_inactive, _lora_layers, _restore

    model = attach_adapter(tiny_model(), make_spec(tmp_path, 4, lora_init=False))
    layers = _lora_layers(model, "default")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for b in (4, 1):  # a full step builds momentum in every component, then a rank-1 step
        with active_rank(model, b, ALPHA / b):
            model(input_ids=IDS, labels=IDS).loss.backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        held = _hold_inactive(layers, "default", b)
        opt.step()
        opt.zero_grad()
        _restore(held)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            assert torch.equal(p[1:], before[name][1:]) and not torch.equal(p[:1], before[name][:1])
        elif "lora_B" in name:
            assert torch.equal(p[:, 1:], before[name][:, 1:])


# -- a planted-rank task: the knee of the nested curve is the grid's ------------------------
PLANTED_K = 2


def planted_ctx(n_train: int = 1024, n_val: int = 128, seq: int = 32) -> TrialContext:
    """FIELD.md's recipe: a tiny Llama with embeddings and head ×10 (else its outputs are
    near-uniform), a teacher with ΔW = 8·‖W‖/√k·U·Vᵀ (rank k) on q, v, up and down, and
    sequences sampled from the teacher. A student LoRA on the base needs rank k."""
    base = tiny_model("llama", seed=0)
    with torch.no_grad():
        base.model.embed_tokens.weight.mul_(10)
        base.lm_head.weight.mul_(10)
    teacher, gen = copy.deepcopy(base), torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in teacher.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                out_dim, in_dim = module.weight.shape
                u = torch.linalg.qr(torch.randn(out_dim, PLANTED_K, generator=gen)).Q
                v = torch.linalg.qr(torch.randn(in_dim, PLANTED_K, generator=gen)).Q
                module.weight += 8 * module.weight.norm() / math.sqrt(PLANTED_K) * u @ v.T

    @torch.no_grad()
    def sample(n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 128, (n, 1), generator=g)
        for _ in range(seq - 1):
            probs = teacher(ids).logits[:, -1].float().softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], dim=1)
        return ids

    tr, va = sample(n_train, 2), sample(n_val, 3)
    return TrialContext(base, None, "cpu", TokenData(tr, tr.clone(), va, va.clone(), {}))


@pytest.mark.slow
def test_nested_knee_matches_the_grid_on_a_planted_task(tmp_path):
    """k = 2, ranks 1/2/4/8, 300 steps of 8×32 tokens, fixed alpha 8, lr 3e-3 (~25 s on one
    core). Measured: grid 4.210/4.098/4.026/4.030, nested 4.305/4.225/4.228/4.331; at a 1%
    tolerance the grid's knee is r = 4 and the nested curve's r = 2 (at 500 steps both said
    4). Asserted: the knees are at most one step of the list apart."""
    from rankwise.core.criteria import recommend
    from rankwise.core.scores import rank_scores

    ranks, tolerance = [1, 2, 4, 8], 0.01
    ctx = planted_ctx()

    def spec(r: int) -> TrialSpec:
        return make_spec(tmp_path, r, steps=300, batch_size=8, eval_every=75, lr=3e-3)

    grid = [run_trial(spec(r), ctx) for r in ranks]
    nested = run_nested(with_nested(spec(ranks[-1]), ranks, POLICIES["fixed"][1]), ctx)
    assert all(r.ok for r in grid + nested)
    knee_grid = recommend(rank_scores(grid), tolerance).rank
    knee_nested = recommend(rank_scores(nested), tolerance).rank
    assert abs(ranks.index(knee_grid) - ranks.index(knee_nested)) <= 1, (grid, nested)


def test_a_nested_run_is_described_by_its_spec_alone(tmp_path):
    """The decision protected: a nested run travels as its serialisable spec (a Ray worker
    gets nothing else): its truncations, their scales and the rank draw round-trip JSON."""
    from rankwise.records import NestedRun

    spec = with_nested(make_spec(tmp_path, 4), [1, 2, 4], POLICIES["fixed"][1], "normal")
    back = TrialSpec.from_json(spec.to_json())
    assert back.nested == spec.nested
    assert isinstance(back.nested, NestedRun) and back.nested.ranks == (1, 2, 4)
    assert back.nested.scale_for(2) == POLICIES["fixed"][1](2)
    assert back.nested.distribution == "normal"
