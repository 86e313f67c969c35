"""``--serve vllm[:MAX]``: only ranks vLLM loads are candidates, and the answer says the
``--max-lora-rank`` to start it with (vLLM loads ranks 1, 8, 16, 32, 64, 128, 256, 320, 512
up to its --max-lora-rank, default 16: an adapter at r=2 or r=4 does not load)."""

from __future__ import annotations

import json

import pytest
import yaml

from rankwise.cli import main
from rankwise.config import ConfigError, Options, SearchConfig
from rankwise.report.export import export_config
from rankwise.report.recommendation import max_lora_rank

from .conftest import fast_args


@pytest.mark.parametrize(
    "serve, ranks, expected",
    [
        ("vllm", None, [1, 8, 16]),  # the default ranks, up to vLLM's default max 16
        ("vllm:64", None, [1, 8, 16, 32, 64]),
        ("vllm:512", "2,4,8,320,400", [8, 320]),
    ],
)
def test_candidates_are_the_ranks_vllm_loads(serve, ranks, expected):
    kw = {"serve": serve} | ({"ranks": ranks} if ranks else {})
    assert SearchConfig(**kw).ranks == expected


def test_max_rank_keeps_its_meaning_and_start_rank_snaps_into_the_set():
    cfg = SearchConfig(serve="vllm:64", max_rank=32)
    assert cfg.max_rank == 32 and cfg.max_lora_rank == 64
    assert cfg.start_rank_for(n_params=135_000_000) == 8  # 4 by model size: nearest is 8


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"serve": "vllm:12"}, "--serve vllm:12: '12' is not a rank vLLM loads"),
        ({"serve": "vllm", "ranks": "2,4"}, "--serve vllm: none of --ranks 2,4 is a rank vLLM"),
        ({"serve": "vllm", "start_rank": 4, "ranks": "1,4,8"}, "(the ranks --serve vllm loads)"),
    ],
)
def test_bad_serve(kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Options.from_flat(kw)


def test_pattern_needs_the_max_lora_rank_of_its_largest_module():
    # axolotl's vLLM path sets max_lora_rank = lora_r: a module above r would not load
    assert max_lora_rank({"r": 8, "rank_pattern": {"a.q_proj": 16, "a.v_proj": 1}}) == 16
    assert max_lora_rank({"r": 2}) == 8


def test_a_served_search_never_trains_r2_or_r4(tmp_path, llama_dir, text_jsonl):
    run = tmp_path / "run"
    args = ["search", "--model", str(llama_dir), "--train", str(text_jsonl), "--out", str(run),
            "--serve", "vllm", "--strategy", "grid"]  # fmt: skip
    for k, v in fast_args(max_steps=4).items():
        args += ["--" + k.replace("_", "-")] + ([] if v is True else [str(v)])
    assert main(args) == 0
    rec = json.loads((run / "recommendation.json").read_text())
    trained = {t["rank"] for t in rec["trials"]}
    assert trained == {1, 8, 16}  # the default ranks with 2, 4 (and above 16) left out
    assert rec["serve"]["max_lora_rank"] == rec["rank"] and rec["serve"]["serve_cap"] == 16
    assert rec["serve"]["command"].endswith(f"--max-lora-rank {rec['serve']['max_lora_rank']}")
    text = export_config(run, "axolotl")
    assert f"# Serve it with vLLM: --max-lora-rank {rec['serve']['max_lora_rank']}" in text
    assert yaml.safe_load(text)["lora_r"] in (1, 8, 16)
