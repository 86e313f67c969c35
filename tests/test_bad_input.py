"""Bad input: one clear line on stderr naming the file/flag/field, exit 2, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rankwise.cli import main
from rankwise.errors import ConfigError

from .conftest import check_error
from .conftest import search_argv as cli_args


def search_argv(model, train, out, *extra):
    return cli_args(model, train, out, ranks="1,2") + list(extra)


CASES = {
    "missing file": (lambda p: p / "nope.jsonl", [], ["--train", "does not exist"]),
    "empty file": (
        lambda p: (p / "e.jsonl", (p / "e.jsonl").write_text(""))[0],
        [],
        ["e.jsonl holds no records"],
    ),
    "unreadable file": (
        lambda p: (p / "b.txt", (p / "b.txt").write_bytes(b"\xff\xfe"))[0],
        [],
        ["b.txt is not UTF-8"],
    ),
    "malformed jsonl": (
        lambda p: (
            p / "m.jsonl",
            (p / "m.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{oops}\n'),
        )[0],
        [],
        ["m.jsonl, line 3: malformed JSON"],
    ),
    "missing field": (
        lambda p: (
            p / "f.jsonl",
            (p / "f.jsonl").write_text(json.dumps({"body": "x", "title": "y"}) + "\n"),
        )[0],
        [],
        ["fields body, title", "'text'"],
    ),
    "unknown target": (
        None,
        ["--target-modules", "wq,wv"],
        ["--target-modules", "no linear module named wq, wv", "q_proj", "v_proj"],
    ),
    "rank zero": (None, ["--ranks", "0,2"], ["--ranks: every rank must be a positive integer"]),
    "regret zero": (
        None,
        ["--max-regret", "0"],
        ["--max-regret: expected a share of the val loss in (0, 1)"],
    ),
    "regret one": (
        None,
        ["--max-regret", "1"],
        ["--max-regret: expected a share of the val loss in (0, 1)"],
    ),
    "rank not integer": (None, ["--ranks", "1,2.5"], ["--ranks: expected integers, got '2.5'"]),
    "rank above layer size": (
        None,
        ["--ranks", "1,128"],
        ["rank 128 exceeds", "min(in, out) = 64"],
    ),
    "empty validation": (
        lambda p: (
            p / "s.jsonl",
            (p / "s.jsonl").write_text("\n".join(json.dumps({"text": f"t{i}"}) for i in range(5))),
        )[0],
        [],
        ["validation set would be empty"],
    ),
    "malformed size": (None, ["--max-memory", "20XB"], ["--max-memory"]),
    "schedule arguments not an object": (
        None,
        ["--lr-scheduler-kwargs", "[1, 2]"],
        ["--lr-scheduler-kwargs: expected a JSON object"],
    ),
    "schedule argument it does not take": (
        None,
        ["--lr-scheduler", "cosine", "--lr-scheduler-kwargs", '{"cycles": 2}'],
        ["--lr-scheduler-kwargs: cosine takes no argument 'cycles'", "num_cycles"],
    ),
    "floor on a schedule without one": (
        None,
        ["--lr-scheduler", "cosine", "--min-lr-ratio", "0.1"],
        ["--min-lr-ratio", "cosine_with_min_lr", "not cosine"],
    ),
    "neftune alpha zero": (None, ["--neftune-alpha", "0"], ["--neftune-alpha: must be > 0"]),
    "dora with nested": (
        None,
        ["--use-dora", "--strategy", "nested"],
        ["--use-dora", "--strategy nested"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(
    tmp_path, llama_dir, text_jsonl, capsys, case
):
    make, extra, fragments = CASES[case]
    train = make(tmp_path) if make else text_jsonl
    out = tmp_path / "run"
    check_error(capsys, search_argv(llama_dir, train, out, *extra), *fragments)
    assert not out.exists()


def test_model_that_cannot_be_loaded_offline(tmp_path, text_jsonl, capsys):
    out = tmp_path / "run"
    check_error(
        capsys,
        search_argv("nobody/no-such-model", text_jsonl, out),
        "--model: nobody/no-such-model: cannot load",
    )
    assert not out.exists()


def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


MODEL_CASES = {
    "fake gguf": (
        lambda p, m: (p / "fake.gguf", (p / "fake.gguf").write_bytes(b"not a gguf file" * 10))[0],
        ["fake.gguf is not a GGUF file"],
    ),
    "truncated safetensors": (
        lambda p, m: _truncate(_copy_model(m, p / "trunc") / "model.safetensors"),
        ["--model:", "trunc", "cannot load the model"],
    ),
    "unknown architecture": (
        lambda p, m: _edit_config(_copy_model(m, p / "arch"), model_type="no-such-arch"),
        ["--model:", "arch", "cannot load"],
    ),
    "missing tokenizer": (
        lambda p, m: _drop_tokenizer(_copy_model(m, p / "notok")),
        ["--model:", "notok", "cannot load its tokenizer"],
    ),
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.parent


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return d


def _drop_tokenizer(d):
    for f in d.iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            f.unlink()
    return d


@pytest.mark.parametrize("case", sorted(MODEL_CASES))
def test_model_that_cannot_be_loaded(case, tmp_path, llama_dir, text_jsonl, capsys):
    make, fragments = MODEL_CASES[case]
    model = make(tmp_path, llama_dir)
    out = tmp_path / "run"
    check_error(capsys, search_argv(model, text_jsonl, out), *fragments)
    assert not out.exists()


def test_model_directory_without_config(tmp_path, text_jsonl, capsys):
    (tmp_path / "m").mkdir()
    check_error(
        capsys, search_argv(tmp_path / "m", text_jsonl, tmp_path / "run"), "has no config.json"
    )


def test_output_directory_that_cannot_be_written(tmp_path, llama_dir, text_jsonl, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    check_error(
        capsys,
        search_argv(llama_dir, text_jsonl, blocker / "run"),
        "--out: cannot create",
        "is not a directory",
    )
    assert blocker.read_text() == "x"


def test_unknown_schedule_lists_the_known_ones(tmp_path, capsys):
    """A schedule transformers has not: exit 2, one line naming the flag and every known one,
    from the command line (argparse's choices) and from YAML (the config's own check)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["search", "--lr-scheduler", "cosin"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "--lr-scheduler" in err and "'cosin'" in err and "'warmup_stable_decay'" in err
    config = tmp_path / "c.yaml"
    config.write_text("lr_scheduler: cosin\n")
    check_error(capsys, ["search", "--config", str(config)], "--lr-scheduler: expected one of",
                "cosine_with_min_lr", "got 'cosin'")  # fmt: skip


def test_unknown_yaml_key_and_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "c.yaml"
    bad.write_text("rnak: 4\n")
    check_error(capsys, ["search", "--config", str(bad)], "unknown option 'rnak'")
    bad.write_text("ranks: [1, 2\n")
    check_error(capsys, ["search", "--config", str(bad)], "c.yaml", "malformed YAML")


def test_real_process_exit_code_and_debug_traceback(tmp_path):
    args = [
        "search",
        "--train",
        str(tmp_path / "x.jsonl"),
        "--out",
        str(tmp_path / "run"),
        "--model",
        str(tmp_path),
    ]
    # One real process: its exit status, and a stderr of one line (no import chatter).
    plain = subprocess.run(
        [sys.executable, "-m", "rankwise.cli", *args], capture_output=True, text=True
    )
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1
    # --debug lets the error propagate (a real process prints its traceback).
    with pytest.raises(ConfigError):
        main([*args, "--debug"])
