"""The trials train the run the recipe describes: its learning-rate schedule (every
transformers ``get_scheduler`` type, at the rate transformers gives each step), DoRA, and
NEFTune (noise on the input embeddings in training, never in evaluation, gone afterwards).
An axolotl recipe with all three runs without a warning for them, its trials record them, and
its adapter loads with plain PEFT as a DoRA adapter. Tiny Llama, a few steps each."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rankwise.cli import main
from rankwise.config import Options
from rankwise.config.schedules import SCHEDULERS
from rankwise.records import TrialKind, Variant
from rankwise.training.hooks import Hooks
from rankwise.training.lifecycle import run_lifecycle
from rankwise.training.schedule import linear_schedule

from .conftest import make_spec, sentences
from .test_lifecycle import digest


class Rates(Hooks):
    """Notes the learning rate each optimizer step uses."""

    def __init__(self):
        self.seen: list[float] = []

    def optimizer_step(self, peft_model, optimizer):
        self.seen.append(optimizer.param_groups[0]["lr"])
        super().optimizer_step(peft_model, optimizer)


def transformers_rates(name: str, steps: int, warmup: int, lr: float, kwargs: dict) -> list:
    """The rate of each step under transformers' own scheduler, stepped as its Trainer does."""
    from transformers import get_scheduler

    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = get_scheduler(name, opt, warmup, steps, scheduler_specific_kwargs=dict(kwargs))
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def test_the_schedule_names_are_the_pinned_transformers_own():
    """The names --lr-scheduler offers (written out so --help imports no transformers) are
    exactly transformers.SchedulerType's: none missing, none it would refuse."""
    from transformers import SchedulerType

    assert SCHEDULERS == tuple(s.value for s in SchedulerType)


SCHEDULES = {
    "cosine": {},
    "cosine_with_restarts": {"num_cycles": 2},
    "polynomial": {"power": 2.0, "lr_end": 1e-4},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {"timescale": 3},
    "cosine_with_min_lr": {"min_lr_rate": 0.1},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.2, "warmup_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 3, "decay_type": "linear"},
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_each_step_trains_at_the_rate_transformers_gives_it(tiny_ctx, name):
    """Decision: a trial's schedule is transformers' get_scheduler, stepped once per optimizer
    step after it, over the trial's own steps and warm-up; the rate of every step is the one
    the user's Trainer run would use."""
    kwargs = SCHEDULES[name]
    spec = make_spec(
        2, max_steps=8, warmup_steps=2, eval_every=8, lr_scheduler=name, lr_scheduler_kwargs=kwargs
    )
    hooks = Rates()
    assert run_lifecycle(spec, tiny_ctx, hooks)[0].ok
    assert hooks.seen == pytest.approx(transformers_rates(name, 8, 2, spec.train.lr, kwargs))
    assert len(set(hooks.seen)) > 1 or name == "constant"


def test_linear_is_the_schedule_rankwise_always_trained():
    """Decision: --lr-scheduler linear (the default) keeps the schedule every earlier run and
    the parity test against a plain PEFT loop used: HF's decay, a warm-up that starts at
    1/(warmup+1) of the peak instead of at 0."""
    factor = linear_schedule(2, 6)
    assert [factor(s) for s in range(6)] == pytest.approx([1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25])
    hf = transformers_rates("linear", 6, 2, 1.0, {})
    assert hf[0] == 0 and hf[2:] == pytest.approx([factor(s) for s in range(2, 6)])


def test_reduce_on_plateau_steps_on_each_evaluations_loss(tiny_ctx):
    """Decision: reduce_lr_on_plateau (and greedy) follow the validation score, stepped with
    each evaluation's loss and never by the optimizer step, as transformers' Trainer does."""
    kwargs = {"patience": 0, "factor": 0.5, "threshold": 0.0, "threshold_mode": "abs"}
    spec = make_spec(2, max_steps=9, eval_every=3, lr_scheduler="reduce_lr_on_plateau",
                     lr_scheduler_kwargs=kwargs, lr=5e-2)  # fmt: skip
    hooks = Rates()
    result = run_lifecycle(spec, tiny_ctx, hooks)[0]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=spec.train.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **kwargs)
    expected = []
    for step in range(1, 10):
        expected.append(opt.param_groups[0]["lr"])
        if step % 3 == 0:
            plateau.step(dict(result.val_curve)[step])
    assert hooks.seen == pytest.approx(expected)


def test_the_calibration_and_the_cutoff_read_the_trials_schedule():
    """Decision: the learning-rate calibration trains under the trial's own schedule (over
    its shorter horizon), and --stop-when-decided reads its table of late gap moves (measured
    under linear decay) on that schedule: a constant rate leaves more to learn late, so no
    trial stops as early as under linear decay."""
    from rankwise.core.cutoff import DRIFT
    from rankwise.run.runner import TrialRunner
    from rankwise.training.schedule import drift_for

    opts = Options.from_flat({"lr_scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.1})
    runner = TrialRunner(opts, None, None, None, None, None, ranks=[1], targets=[],
                         baseline_bytes=0, elapsed=lambda: 0.0)  # fmt: skip
    calibration = runner.train_spec(0, Variant(TrialKind.CALIBRATION, "lr", lr=1e-3, max_steps=5))
    assert calibration.lr_scheduler == "cosine_with_min_lr" and calibration.max_steps == 5
    assert calibration.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    constant = drift_for(calibration.replace(lr_scheduler="constant", max_steps=100), DRIFT)
    assert [f for f, _ in constant] > [f for f, _ in DRIFT]
    assert drift_for(calibration.replace(lr_scheduler="greedy"), DRIFT) is None


# -- NEFTune --------------------------------------------------------------------------------------
class Embeddings(Hooks):
    """At the first evaluation (mid-trial, NEFTune on), the input embeddings of a batch in
    training mode and in eval mode, against the clean lookup."""

    def __init__(self, ids):
        self.ids, self.seen = ids, {}

    def evaluate(self, peft_model, run, ctx):
        if not self.seen:
            emb = peft_model.get_input_embeddings()
            clean = emb.weight[self.ids].detach()
            with torch.no_grad():
                peft_model.train()
                self.seen["train"] = emb(self.ids) - clean
                peft_model.eval()
                self.seen["eval"] = emb(self.ids) - clean
            peft_model.train()
        super().evaluate(peft_model, run, ctx)


def test_neftune_noises_training_embeddings_only_and_leaves_nothing(tiny_ctx):
    """Decision: --neftune-alpha is transformers' NEFTune: uniform noise in
    ±alpha/sqrt(seq_len*hidden) on the input embeddings in training mode, none in eval mode
    (validation losses are never noised), and the hook gone when the trial ends."""
    model = tiny_ctx.model
    before, ids = digest(model), tiny_ctx.data.train_ids[:4]
    hooks = Embeddings(ids)
    noisy = run_lifecycle(make_spec(2, neftune_alpha=5.0), tiny_ctx, hooks)[0]
    assert noisy.ok
    bound = 5.0 / math.sqrt(ids.shape[1] * model.config.hidden_size)
    noise = hooks.seen["train"]
    assert noise.abs().max() <= bound * (1 + 1e-6) and noise.abs().max() > 0.9 * bound
    assert noise.mean().abs() < 0.05 * bound  # centred: uniform, not a shift
    assert torch.equal(hooks.seen["eval"], torch.zeros_like(hooks.seen["eval"]))
    embeddings = model.get_input_embeddings()
    assert not embeddings._forward_hooks and not hasattr(embeddings, "neftune_noise_alpha")
    assert digest(model) == before
    plain = run_lifecycle(make_spec(2), tiny_ctx)[0]
    assert plain.train_curve != noisy.train_curve  # the noise reached the training steps


# -- the recipes' keys ------------------------------------------------------------------------------
RECIPES = {
    "trl": ({"output_dir": "o", "use_peft": True, "lr_scheduler_type": "cosine_with_restarts",
             "lr_scheduler_kwargs": '{"num_cycles": 3}', "use_dora": True,
             "neftune_noise_alpha": 5},
            {"lr_scheduler": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 3},
             "use_dora": True, "neftune_alpha": 5}),
    "llama-factory": ({"stage": "sft", "model_name_or_path": "m",
                       "lr_scheduler_type": "warmup_stable_decay",
                       "lr_scheduler_kwargs": {"num_decay_steps": 10}, "use_dora": True,
                       "neftune_noise_alpha": 3},
                      {"lr_scheduler": "warmup_stable_decay",
                       "lr_scheduler_kwargs": {"num_decay_steps": 10}, "use_dora": True,
                       "neftune_alpha": 3}),
    "axolotl": ({"base_model": "m", "lr_scheduler": "cosine", "cosine_min_lr_ratio": 0.1,
                 "peft_use_dora": True, "neftune_noise_alpha": 0},
                {"lr_scheduler": "cosine_with_min_lr", "min_lr_ratio": 0.1, "use_dora": True}),
}  # fmt: skip


@pytest.mark.parametrize("tool", sorted(RECIPES))
def test_each_tools_schedule_dora_and_neftune_keys_become_options(tmp_path, tool):
    """Decision: TRL's and LLaMA-Factory's lr_scheduler_type, lr_scheduler_kwargs (a mapping
    or TrainingArguments' JSON string), use_dora and neftune_noise_alpha, and axolotl's cosine
    with cosine_min_lr_ratio (transformers' cosine_with_min_lr), are the search's options,
    valid as they are, and warned about by none (NEFTune alpha 0 adds no noise: off)."""
    from rankwise.io.recipes import read_recipe

    keys, expected = RECIPES[tool]
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(keys))
    recipe = read_recipe(path)
    assert recipe.tool == tool
    assert {k: recipe.options.get(k) for k in expected} == expected
    assert ("neftune_alpha" in recipe.options) == (tool != "axolotl")  # axolotl's alpha is 0
    Options.from_flat({k: v for k, v in recipe.options.items() if k != "model"})
    assert not [w for w in recipe.warnings if "schedul" in w or "dora" in w or "neftune" in w]


# -- the axolotl recipe, end to end -----------------------------------------------------------------
AXOLOTL = """\
base_model: {model}
adapter: lora
datasets:
  - path: {data}
    type: alpaca
val_set_size: 0.1
sequence_len: 32
sample_packing: true
micro_batch_size: 4
max_steps: 6
learning_rate: 0.003
warmup_steps: 1
lr_scheduler: cosine
peft_use_dora: true
neftune_noise_alpha: 5
lora_r: 16
lora_alpha: 16
lora_target_modules: [q_proj, v_proj]
"""


def test_axolotl_recipe_trains_cosine_dora_and_neftune(tmp_path, llama_dir, capsys):
    """Decision: an axolotl recipe's lr_scheduler, peft_use_dora and neftune_noise_alpha are
    what every trial trains with (no warning for them); the delivered adapter is a DoRA
    adapter plain PEFT loads, rankwise inspect reads, and the export writes the three back."""
    from peft import PeftModel

    from rankwise.analysis.spectra import inspect_adapter
    from rankwise.report.export import export
    from rankwise.storage.store import RunStore
    from rankwise.testing import tiny_model

    data = tmp_path / "a.jsonl"
    rows = [{"instruction": f"Repeat: {s}", "input": "", "output": s} for s in sentences(48)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    recipe, run = tmp_path / "axolotl.yml", tmp_path / "run"
    recipe.write_text(AXOLOTL.format(model=llama_dir, data=data))
    argv = ["search", "--from", str(recipe), "--out", str(run), "--ranks", "1,2",
            "--start-rank", "1", "--max-seeds", "1", "--quiet", "--dtype", "float32",
            "--eval-every", "3", "--no-retain"]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    rec = json.loads((run / "recommendation.json").read_text())
    said = " ".join(rec["warnings"]) + capsys.readouterr().err
    for key in ("lr_scheduler", "peft_use_dora", "neftune_noise_alpha"):
        assert key not in said
    store = RunStore(run, readonly=True)
    trained = [r for r in store.results() if r.kind == TrialKind.MAIN]
    assert trained and all(r.ok for r in trained)
    for r in trained:
        spec = store.spec(r.key)
        assert (spec.train.lr_scheduler, spec.lora.use_dora, spec.train.neftune_alpha) == (
            "cosine", True, 5.0)  # fmt: skip
    assert rec["budget"]["holds_for"].startswith("6 steps, cosine schedule")
    adapter = run / rec["adapter_dir"]
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    loaded = PeftModel.from_pretrained(tiny_model("llama"), str(adapter))
    q = loaded.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_magnitude_vector["default"].weight.shape == (64,)
    assert len(inspect_adapter(adapter).modules) == 4  # q and v in 2 layers; magnitudes skipped
    cfg = export(run, "axolotl").setup | export(run, "axolotl").keys
    assert (cfg["lr_scheduler"], cfg["peft_use_dora"], cfg["neftune_noise_alpha"]) == (
        "cosine", True, 5.0)  # fmt: skip
