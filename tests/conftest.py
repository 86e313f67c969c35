"""Shared fixtures and helpers: tiny models written once per session, small data files, one
TrialSpec factory (:func:`make_spec`) and the benchmarks' smoke runner (``bench_main``)."""

from __future__ import annotations

import dataclasses
import json
import os
import random

import pytest

from rankwise.records import LoraSpec, TrainSpec, TrialSpec

# One torch thread, in this process and in the ones tests start: the tiny models' tensors are
# too small to gain from a second thread, and on two shared cores its spin-waiting made trials
# up to 10x slower (a warm-start test: 2.35 s -> 0.18 s). Tests that compare against a Ray
# worker (one thread each) already set it themselves.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest files first (`make test` runs `pytest -n 2 --dist loadfile`, which hands whole
# files to the workers in collection order): a long file collected last would run alone
# while the other worker idles. Within a file the order is unchanged.
LONGEST_FIRST = (
    "test_executor.py",
    "test_bench_smoke.py",
    "test_models.py",
    "test_nested.py",
    "test_cli.py",
    "test_rundir.py",
    "test_perlayer.py",
    "test_classify.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


WORDS = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # torch may be imported before this file sets OMP_NUM_THREADS
    yield
    torch.set_num_threads(threads)


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


_LORA_FIELDS = {f.name for f in dataclasses.fields(LoraSpec)} - {"r"}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainSpec)} - {"seed"}


def make_spec(
    rank: int = 4,
    *,
    key: str | None = None,
    seed: int = 0,
    model: dict | None = None,
    data_dir: str = "",
    adapter_dir: str | None = None,
    **overrides,
) -> TrialSpec:
    """A trial on the tiny models: rank ``rank`` on q/v, four steps at a rate that moves them.

    ``overrides`` go to :class:`LoraSpec` or :class:`TrainSpec` by field name (their fields do
    not overlap but for ``seed``, which, as in ``TrialRunner.spec_for``, sets both the trial's
    seed and its training seed). The key defaults to the search's own, ``r{rank}-s{seed}``.

        >>> make_spec(2, lora_dropout=0.1, max_steps=1).lora.lora_dropout
        0.1
    """
    unknown = set(overrides) - _LORA_FIELDS - _TRAIN_FIELDS
    if unknown:
        raise TypeError(f"make_spec: neither a LoraSpec nor a TrainSpec field: {sorted(unknown)}")
    lora = {"lora_alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}
    train = {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_steps": 0, "eval_every": 2}
    lora |= {k: v for k, v in overrides.items() if k in _LORA_FIELDS}
    train |= {k: v for k, v in overrides.items() if k in _TRAIN_FIELDS}
    return TrialSpec(
        key=key or f"r{rank}-s{seed}",
        rank=rank,
        seed=seed,
        lora=LoraSpec(r=rank, **lora),
        train=TrainSpec(seed=seed, **train),
        model=model or {},
        data_dir=data_dir,
        adapter_dir=None if adapter_dir is None else str(adapter_dir),
    )


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
        # One seed per rank: racing (a second and third seed where an answer is close) about
        # doubles a search's trials, and tests/test_noise.py is where it is tested.
        "max_seeds": 1,
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


# -- the benchmarks' smoke modes ----------------------------------------------------------------
@pytest.fixture
def bench_main(capsys):
    """Runs a benchmark's ``main(["--smoke", *argv])`` in this process; returns its stdout.

    In this process rather than a subprocess: a new interpreter spends seconds importing
    torch, transformers and peft again. The benchmarks set torch's thread count for their
    own measurements; it is put back.
    """
    import torch

    def run(module, *argv: str) -> str:
        threads = torch.get_num_threads()
        try:
            code = module.main(["--smoke", *argv])
        finally:
            torch.set_num_threads(threads)
        out = capsys.readouterr().out
        assert code == 0, out[-3000:]
        return out

    return run


def check_error(capsys, argv, *fragments) -> str:
    """The CLI refuses ``argv``: exit 2, one line on stderr holding every fragment, no
    traceback. Returns the line."""
    from rankwise.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err
