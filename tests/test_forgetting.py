"""Forgetting per rank (rankwise.training.retain): the retain set, the measurement at the
best checkpoint, ``--max-forgetting``, and the retain options' bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rankwise.cli import main
from rankwise.config import Options
from rankwise.errors import ConfigError
from rankwise.records import COMPLETE, SKIPPED, TrialKind, TrialResult
from rankwise.training import retain as rt

from .conftest import search_argv


@pytest.fixture(scope="module")
def tiny():
    from rankwise.testing import make_tokenizer, tiny_model

    return tiny_model("llama").requires_grad_(False), make_tokenizer()


def trained(model, scale: float = 0.5):
    """``model`` with a rank-4 adapter whose B is not zero: it moves every distribution."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, scale)
    return peft_model


def exact_kl(peft_model, retain) -> float:
    """KL(base || adapted) over the whole vocabulary, the base with the adapter disabled."""
    with torch.no_grad():
        q = peft_model(input_ids=retain.ids).logits[:, :-1].float().log_softmax(-1)
        with peft_model.disable_adapter():
            p = peft_model(input_ids=retain.ids).logits[:, :-1].float().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_sampling_is_seeded_and_the_seed_moves_it(tiny):
    model, tok = tiny
    a = rt.self_sampled(model, tok, "cpu", seed=0, sequences=2, length=10)
    b = rt.self_sampled(model, tok, "cpu", seed=0, sequences=2, length=10)
    c = rt.self_sampled(model, tok, "cpu", seed=1, sequences=2, length=10)
    assert a.sha256 == b.sha256 != c.sha256
    assert (a.ids[:, 0] == tok.bos_token_id).all()  # every sequence starts at BOS


def test_the_kl_is_exact_with_every_token_and_a_lower_bound_with_fewer(tiny, monkeypatch):
    model, tok = tiny
    full = rt.self_sampled(model, tok, "cpu", seed=0, sequences=4, length=16)  # K = vocab
    monkeypatch.setattr(rt, "TOP_K", 8)
    binned = rt.self_sampled(model, tok, "cpu", seed=0, sequences=4, length=16)
    assert binned.extra["top_k_mass"] < 1.0 == full.extra["top_k_mass"]
    peft_model = trained(model)
    try:
        exact = exact_kl(peft_model, full)
        got_full = rt.forgetting(peft_model, full, "cpu")
        got_binned = rt.forgetting(peft_model, binned, "cpu")
    finally:
        peft_model.unload()
    assert exact > 0.01  # the adapter drifts, so the check below is not 0 <= 0
    assert got_full["forgetting_kl"] == pytest.approx(exact, rel=1e-4)
    assert 0 < got_binned["forgetting_kl"] < exact
    # The same tokens and model: the loss increase does not depend on K.
    assert got_binned["forgetting"] == pytest.approx(got_full["forgetting"], abs=1e-6)


def test_the_cache_is_reused_only_when_built_the_same_way(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    monkeypatch.setattr(rt, "RETAIN_SEQUENCES", 2)
    monkeypatch.setattr(rt, "RETAIN_LENGTH", 8)
    opts = Options.from_flat({"model": "m", "train": "t"})
    cache = tmp_path / "retain.safetensors"
    first, key = rt.prepare_retain(opts, model, tok, "cpu", None, cache)
    first.save(cache, key)

    def no_sampling(*a, **k):
        raise AssertionError("sampled again")

    monkeypatch.setattr(rt, "self_sampled", no_sampling)
    again, _ = rt.prepare_retain(opts, model, tok, "cpu", None, cache)
    assert again.sha256 == first.sha256 and again.base_loss == first.base_loss
    other = Options.from_flat({"model": "m", "train": "t", "seed": 1})
    with pytest.raises(AssertionError, match="sampled again"):  # another seed: not the cache
        rt.prepare_retain(other, model, tok, "cpu", None, cache)
    off = Options.from_flat({"model": "m", "train": "t", "retain": False})
    assert rt.prepare_retain(off, model, tok, "cpu", None, cache) == (None, "")


def test_a_retain_file_packs_its_loss_tokens(tiny, tmp_path):
    model, tok = tiny
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"text": f"general line {i}"}) + "\n" for i in range(50)))
    opts = Options.from_flat({"model": "m", "train": "t", "retain": str(path)})
    fmt, records = rt.read_retain_records(opts)
    retain = rt.from_records(records, fmt, opts.data, tok, model, "cpu", source=str(path))
    assert retain.source == str(path) and retain.ids.shape[1] == rt.RETAIN_LENGTH
    assert 0 < retain.tokens <= rt.RETAIN_SEQUENCES * rt.RETAIN_LENGTH and retain.base_loss > 0


def result(rank: int, forgetting: float | None, kind=TrialKind.MAIN) -> TrialResult:
    return TrialResult(key=f"r{rank}-s0", rank=rank, seed=0, status=COMPLETE, kind=kind,
                       best_val_loss=3.0, forgetting=forgetting)  # fmt: skip


def test_the_budget_skips_curve_ranks_that_drift_more():
    judge = rt.Forgetting(retain=None, ctx=None, run_dir=None, max_forgetting=0.02)
    over = judge.budget(result(16, 0.03))
    assert over.status == SKIPPED and over.forgetting == 0.03 and not over.ok
    assert over.reason == "retain-loss increase 0.0300 nats > --max-forgetting 0.02"
    assert judge.budget(result(4, 0.02)).status == COMPLETE  # at the limit: eligible
    # A stage's variant is judged against the chosen rank, which already passed the budget.
    assert judge.budget(result(16, 0.03, TrialKind.COTUNE)).status == COMPLETE
    assert rt.Forgetting(None, None, None).budget(result(16, 0.03)).status == COMPLETE


def test_max_forgetting_excludes_a_rank_through_the_cli(llama_dir, text_jsonl, tmp_path, capsys):
    # alpha = 2r: r=16 moves the base model ~2x as far as r=1 (0.027 vs 0.012 nats on the
    # retain set), so a limit between them excludes r=16 and the criterion picks r=1.
    out = tmp_path / "run"
    argv = search_argv(llama_dir, text_jsonl, out, "1,16", strategy="grid", lr=3e-2,
                       alpha_policy="ratio", max_forgetting=0.018)  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "recommendation.json").read_text())
    trials = {t["rank"]: t for t in doc["trials"]}
    assert trials[16]["status"] == SKIPPED and trials[16]["forgetting"] > 0.018
    assert "--max-forgetting 0.018" in trials[16]["reason"]
    assert trials[1]["status"] == COMPLETE and trials[1]["forgetting"] <= 0.018
    assert doc["rank"] == 1 and doc["forgetting"]["excluded"][0]["rank"] == 16
    assert "--max-forgetting 0.018 excluded r=16" in doc["reason"]
    capsys.readouterr()
    assert main(["show", str(out)]) == 0
    ranks = capsys.readouterr().out.split("## Ranks")[1]
    header = ranks.splitlines()[2].split(" | ")
    assert "forgetting" in header and "KL" in header
    assert Path(out / "data" / "retain.safetensors").is_file()
    assert "Gain and forgetting vs rank" in (out / "report.html").read_text()


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--retain", "EMPTY"], "--retain: "),
        (["--retain", "MISSING.jsonl"], "--retain: file"),
        (["--max-forgetting", "0"], "--max-forgetting: must be > 0"),
        (["--retain", "EMPTY", "--no-retain"], "--retain: cannot be combined with --no-retain"),
        (["--no-retain", "--max-forgetting", "0.1"], "--max-forgetting: needs a retain set"),
    ],
)
def test_bad_retain_input_exits_2_naming_the_flag(extra, needle, llama_dir, text_jsonl,
                                                  tmp_path, capsys):  # fmt: skip
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    extra = [str(empty) if a == "EMPTY" else str(tmp_path / a) if a.endswith(".jsonl") else a
             for a in extra]  # fmt: skip
    try:  # argparse's errors exit, the options' return 2
        code = main(search_argv(llama_dir, text_jsonl, tmp_path / "run", "1") + extra)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_classifier_takes_no_retain_file():
    with pytest.raises(ConfigError, match="--retain: needs --task causal-lm"):
        rt.check_retain_options(Options.from_flat({"task": "seq-cls", "retain": "x.jsonl"}))
    assert rt.retain_source(Options.from_flat({"task": "seq-cls"})) is None
