"""LoRA on a mixture of experts' fused expert weights (``--target-parameters``, PEFT's
``target_parameters``): a real search on a tiny Qwen3-MoE whose adapter loads in plain PEFT
and scores the recorded loss, the predictions against PEFT, the base after a trial,
per-expert spectra and rank patterns, the recipes' keys, and bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rankwise.analysis.estimate import estimate
from rankwise.analysis.memory import activation_bytes
from rankwise.analysis.params import adapter_file_bytes, lora_param_count
from rankwise.analysis.spectra import inspect_adapter
from rankwise.cli import main
from rankwise.errors import ConfigError
from rankwise.io.experts import targeted_parameters
from rankwise.testing import save_tiny_model, saved_bytes, tiny_model
from rankwise.training.adapter import attached
from rankwise.training.patterns import verify_ranks
from rankwise.training.trial import run_trial

from .conftest import check_error, make_spec, search_argv, sentences
from .test_lifecycle import context, digest

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]  # what `experts` resolves to


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("models") / "qwen3-moe", "qwen3_moe")


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, moe_dir):
    """A grid search over r = 1, 2 on the experts and q_proj, 6 steps a trial."""
    tmp = tmp_path_factory.mktemp("moe-run")
    train = tmp / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": s}) for s in sentences(120)))
    argv = search_argv(
        moe_dir, train, tmp / "run", ranks="1,2", strategy="grid",
        target_parameters="experts", target_modules="q_proj",
    )  # fmt: skip
    assert main(argv) == 0
    return tmp / "run"


def _peft_moe(rank: int, modules, parameters=EXPERTS):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(
            r=rank, target_modules=modules, target_parameters=parameters, init_lora_weights=False
        )
        return get_peft_model(tiny_model("qwen3_moe"), config)


def _val_loss(model, run) -> float:
    """Token-weighted cross-entropy over the run's validation blocks, as trials score it."""
    tokens = load_file(str(run / "data" / "tokens.safetensors"))
    ids, labels = tokens["val_ids"], tokens["val_labels"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"
    )  # ignore_index=-100, the default
    return float(loss) / int((target != -100).sum())


# -- a real search ---------------------------------------------------------------------------
def test_search_on_experts_delivers_an_adapter_plain_peft_loads(moe_run, moe_dir):
    rec = json.loads((moe_run / "recommendation.json").read_text())
    lora = rec["lora_config"]
    assert lora["target_parameters"] == EXPERTS and lora["target_modules"] == ["q_proj"]
    assert lora["lora_dropout"] == 0.0 and {t["rank"] for t in rec["trials"]} == {1, 2}
    for trial in rec["trials"]:  # predicted before training = what PEFT built
        assert trial["predicted"]["trainable_params"] == trial["trainable_params"]
    base = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    model = PeftModel.from_pretrained(base, moe_run / rec["adapter_dir"]).eval()
    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ParamWrapper"]
    assert len(wrapped) == 4  # two parameters in each of two layers
    assert _val_loss(model, moe_run) == pytest.approx(rec["loss"], abs=1e-5)


def test_inspect_splits_each_fused_update_per_expert(moe_run, moe_dir, capsys):
    rec = json.loads((moe_run / "recommendation.json").read_text())
    adapter = moe_run / rec["adapter_dir"]
    spectra = inspect_adapter(adapter)
    experts = [m for m in spectra.modules if m.expert is not None]
    assert {m.name for m in experts} == {
        f"model.layers.{i}.mlp.{p}" for i in (0, 1) for p in EXPERTS
    }
    assert sorted({m.expert for m in experts}) == [0, 1, 2, 3]
    assert {m.rank for m in spectra.modules} == {rec["rank"]}
    # Each expert's singular values are those of PEFT's own delta weight for that expert.
    base = AutoModelForCausalLM.from_pretrained(moe_dir).eval()
    model = PeftModel.from_pretrained(base, adapter)
    delta = {}
    for name, m in model.base_model.model.named_modules():
        if type(m).__name__ == "ParamWrapper":
            key = f"{name.replace('.base_layer', '')}.{m.parameter_name}"
            delta[key] = m.get_delta_weight("default").detach()
    for m in experts:
        want = torch.linalg.svdvals(delta[m.name][m.expert].double())[: m.rank]
        got = torch.tensor(m.singular_values, dtype=torch.float64)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)
    assert main(["inspect", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "expert" in out.splitlines()[4] and "fused experts" in out.splitlines()[0]


# -- predictions against PEFT ------------------------------------------------------------------
@pytest.mark.parametrize("modules", [[], ["q_proj", "v_proj"]], ids=["experts", "with-attn"])
def test_params_and_file_size_match_peft(modules, tmp_path):
    for rank in (1, 3):
        peft_model = _peft_moe(rank, modules)
        expected = lora_param_count(tiny_model("qwen3_moe"), modules, rank, "none", EXPERTS)
        assert expected == peft_model.get_nb_trainable_parameters()[0]
        peft_model.save_pretrained(tmp_path / str(rank))
        size = (tmp_path / str(rank) / "adapter_model.safetensors").stat().st_size
        assert adapter_file_bytes(tiny_model("qwen3_moe"), modules, rank, "none", "float32",
                                  EXPERTS) == size  # fmt: skip


def test_estimate_from_a_directory_takes_the_experts_shorthand(moe_dir):
    rows = estimate(moe_dir, ranks=(1, 2), target_parameters=["experts"], baseline_bytes=0)
    # per layer: gate_up 4 experts x (64 + 64), down_proj 4 x (32 + 64); two layers
    assert [r.trainable_params for r in rows] == [1792, 3584]


def test_memory_counts_the_merged_expert_copies_and_expert_inputs():
    """What LoRA on the experts adds to the saved activations, predicted exactly: each
    parameter's merged copy and every routed token's input (the rank does not matter)."""
    model, ids = tiny_model("qwen3_moe"), torch.randint(4, 100, (2, 32))
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    shapes = targeted_parameters(model, EXPERTS)
    for rank in (1, 4):
        measured = saved_bytes(_peft_moe(rank, ["q_proj"]), ids) - saved_bytes(
            _peft_moe(rank, ["q_proj"], parameters=None), ids
        )
        # on CUDA every term has the same transient factor: the difference is exact
        with_experts = activation_bytes(
            model, targets, rank, 2, 32, device="cuda", parameters=shapes
        )
        without = activation_bytes(model, targets, rank, 2, 32, device="cuda")
        assert (with_experts - without) / 1.1 == pytest.approx(measured, abs=2)


# -- the base after a trial, rank patterns ---------------------------------------------------
def test_a_trial_that_fails_inside_the_experts_forward_leaves_the_base_as_it_was():
    ctx = context(tiny_model("qwen3_moe"))
    before, calls = digest(ctx.model), []
    experts = ctx.model.model.layers[1].mlp.experts

    def fail(module, args, output):  # runs while PEFT's parametrization is registered
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("boom in the experts")

    handle = experts.register_forward_hook(fail)
    try:
        spec = make_spec(2, target_modules=[], target_parameters=EXPERTS)
        failed = run_trial(spec, ctx)
    finally:
        handle.remove()
    assert failed.status == "failed" and "boom" in failed.reason
    assert digest(ctx.model) == before
    assert not any(hasattr(m, "parametrizations") for m in ctx.model.modules())


def test_a_rank_pattern_sets_an_expert_group_apart():
    """PEFT keys a parameter's rank by the parameter's name; rankwise reads back each
    expert's rank (lora_A's rows / E) and refuses a key that matched nothing."""
    model = tiny_model("qwen3_moe")
    pattern = {"layers.1.mlp.experts.down_proj": 1}
    spec = make_spec(2, target_modules=[], target_parameters=EXPERTS, rank_pattern=pattern)
    with attached(model, spec) as peft_model:
        ranks = verify_ranks(peft_model, peft_model.peft_config["default"])
    assert ranks == {
        "model.layers.0.mlp.experts.gate_up_proj": 2,
        "model.layers.0.mlp.experts.down_proj": 2,
        "model.layers.1.mlp.experts.gate_up_proj": 2,
        "model.layers.1.mlp.experts.down_proj": 1,
    }
    stray = spec.replace(lora=spec.lora.replace(rank_pattern={"layers.1.mlp.down_proj": 1}))
    with pytest.raises(ConfigError, match="matched no LoRA module"):
        with attached(model, stray):
            pass


def test_inspect_proposes_one_rank_per_expert_group(tmp_path):
    """A parameter's experts share one rank in PEFT: the proposal gives each group the
    largest any of its experts needs, keyed by the parameter's name (a rank_pattern key)."""
    peft_model = _peft_moe(4, [])
    with torch.no_grad():  # random factors; expert 0 of layer 0's down_proj: rank 1
        for name, m in peft_model.named_modules():
            if type(m).__name__ != "ParamWrapper":
                continue
            a, b = m.lora_A["default"].weight, m.lora_B["default"].weight
            a.copy_(torch.randn_like(a))
            b.copy_(torch.randn_like(b))
            if m.parameter_name == "down_proj" and ".layers.0." in name:
                b.view(b.shape[0], 4, 4)[:, 1:, 0] = 0  # expert 0: one direction
    peft_model.save_pretrained(tmp_path)
    spectra = inspect_adapter(tmp_path, energy=1.0)
    group = [m for m in spectra.modules if m.name == "model.layers.0.mlp.experts.down_proj"]
    assert [m.effective_rank(1.0) for m in group] == [1, 4, 4, 4]
    proposal = spectra.proposal(1.0)
    assert proposal.ranks["model.layers.0.mlp.experts.down_proj"] == 4
    assert proposal.params == proposal.adapter_params == peft_model.get_nb_trainable_parameters()[0]


# -- recipes and bad input -------------------------------------------------------------------
@pytest.mark.parametrize("tool", ["axolotl", "trl"])
def test_recipes_read_their_target_parameters_key(tool, tmp_path):
    from rankwise.io.recipes import read_recipe

    recipe = tmp_path / "recipe.yml"
    model = {"axolotl": "base_model", "trl": "model_name_or_path"}[tool]
    text = f"{model}: some/model\nlora_target_parameters: [mlp.experts.gate_up_proj]\n"
    text += "lora_dropout: 0\nlora_target_modules: []\n"
    if tool == "axolotl":
        text += "adapter: lora\ndatasets:\n  - path: data.jsonl\n    type: alpaca\n"
        (tmp_path / "data.jsonl").write_text("{}")
    recipe.write_text(text)
    options = read_recipe(recipe).options
    assert options["target_parameters"] == ["mlp.experts.gate_up_proj"]
    assert "target_modules" not in options  # [] beside parameters: those only


def test_bad_target_parameters_exit_2_with_one_line(capsys, moe_dir, llama_dir, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": s}) for s in sentences(20)))

    def argv(model, **over):
        return search_argv(model, train, tmp_path / "run", ranks="1,2", **over)

    check_error(
        capsys, argv(moe_dir, target_parameters="mlp.nope"),
        "--target-parameters", "mlp.nope", "experts.gate_up_proj, experts.down_proj",
    )  # fmt: skip
    check_error(
        capsys, argv(llama_dir, target_parameters="experts"),
        "--target-parameters experts", "no experts", "no 3-D parameters",
    )  # fmt: skip
    check_error(capsys, argv(moe_dir, target_parameters="experts", dropout=0.1), "--dropout")
    check_error(
        capsys, argv(moe_dir, target_parameters="experts", strategy="nested"), "--strategy nested"
    )


@pytest.mark.parametrize("tool", ["axolotl", "trl"])
def test_export_writes_the_tools_target_parameters_key(moe_run, tool, capsys):
    import yaml

    capsys.readouterr()
    assert main(["export", str(moe_run), "--to", tool]) == 0
    keys = yaml.safe_load(capsys.readouterr().out)
    assert keys["lora_target_parameters"] == EXPERTS and keys["lora_target_modules"] == ["q_proj"]
