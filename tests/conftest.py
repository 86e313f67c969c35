"""Shared fixtures: tiny models written once per session, small data files."""

from __future__ import annotations

import json
import random

import pytest

WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("RANKWISE_CACHE", str(tmp_path_factory.getbasetemp() / "rw-cache"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    from rankwise.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "llama", "llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    from rankwise.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("models") / "gpt2", "gpt2")


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(n)]


@pytest.fixture
def text_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"text": s}) for s in sentences(120)))
    return path


@pytest.fixture
def pc_jsonl(tmp_path):
    path = tmp_path / "pc.jsonl"
    rows = [{"prompt": f"Q: {s}\nA:", "completion": " " + s.split()[0]} for s in sentences(120)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture
def chat_jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": s},
                {"role": "assistant", "content": s.split()[-1]},
            ]
        }
        for s in sentences(120)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def fast_args(**over) -> dict:
    """Tiny training settings for end-to-end tests (seconds per search)."""
    args = {
        "max_steps": 6,
        "batch_size": 4,
        "seq_len": 32,
        "eval_every": 3,
        "lr": 3e-3,
        "warmup_steps": 0,
        "quiet": True,
        # fp32 throughout, so tests compare losses exactly; --dtype auto (bf16 autocast where
        # the CPU has it) is tested on its own.
        "dtype": "float32",
    }
    args.update(over)
    return args


def search_argv(model, train, out, ranks: str = "1,2,4", **over) -> list[str]:
    """``rankwise search`` arguments for a tiny end-to-end run (flags from :func:`fast_args`)."""
    args = [
        "search",
        "--model",
        str(model),
        "--train",
        str(train),
        "--out",
        str(out),
        "--ranks",
        ranks,
        "--start-rank",
        "1",
    ]
    for k, v in fast_args(**over).items():
        args += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    return args


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory):
    """A tiny BERT-style encoder (no head): the backbone of ``--task seq-cls`` tests."""
    from rankwise.testing import save_tiny_encoder

    return save_tiny_encoder(tmp_path_factory.mktemp("models") / "bert")


@pytest.fixture(scope="session")
def topics_jsonl(tmp_path_factory):
    """Standard-library docstrings labelled by their package (rankwise.testing.stdlib_topics)."""
    from rankwise.testing import stdlib_topics

    path = tmp_path_factory.mktemp("data") / "topics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in stdlib_topics()))
    return path


@pytest.fixture(scope="module")
def tiny_ctx():
    """A tiny Llama and 24 train / 6 val random blocks of 16 tokens, as a TrialContext."""
    import torch

    from rankwise.io.data import TokenData
    from rankwise.testing import tiny_model
    from rankwise.training.adapter import TrialContext

    torch.manual_seed(0)
    ids = torch.randint(4, 100, (24, 16))
    val = torch.randint(4, 100, (6, 16))
    model = tiny_model("llama").requires_grad_(False)
    return TrialContext(model, None, "cpu", TokenData(ids, ids.clone(), val, val.clone(), {}))
