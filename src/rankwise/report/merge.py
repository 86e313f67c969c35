"""``rankwise export DIR --to TOOL --merge-into FILE``: the answer written into the user's own
training config, every other key, the order and the comments kept.

YAML is read and written round trip (ruamel.yaml): a LoRA key the file has gets the
answer's value in place (its end-of-line comment stays); one it lacks goes after the last
LoRA key it has (or at the end); a comment block before the first of them says what
rankwise set, which budget the answer holds for, what the tool has no key for, and the
vLLM ``--max-lora-rank``. A per-module pattern the file holds but the answer does not is
removed (it would override the answer). The model, quantization, schedule and NEFTune keys
are not changed: where the file's differ from what the search used (a key it leaves out
counts as the tool's default), the comment says so. A JSON file
(TRL's ``TrainingArguments`` as JSON) keeps its key order; JSON has no comments, so the
notes come back as notes.

Example:
    >>> import json, tempfile
    >>> from pathlib import Path
    >>> d = Path(tempfile.mkdtemp())
    >>> lora = {"r": 8, "lora_alpha": 16.0, "target_modules": "all-linear",
    ...         "lora_dropout": 0.05, "bias": "none", "use_rslora": False}
    >>> rec = {"rank": 8, "name": "demo", "model": "m", "reason": "r=8: val loss 1.2",
    ...        "lora_config": lora}
    >>> _ = (d / "recommendation.json").write_text(json.dumps(rec))
    >>> _ = (d / "axolotl.yml").write_text("base_model: m  # the base\\n"
    ...     "lora_r: 32  # to be searched\\nlora_alpha: 16\\nlearning_rate: 2e-4\\n")
    >>> merged = merge_into(d, "axolotl", d / "axolotl.yml", d / "out.yml")
    >>> print(merged.path.read_text(), end="")
    base_model: m  # the base
    # rankwise (run demo): r=8: val loss 1.2
    lora_r: 8   # to be searched
    lora_alpha: 16
    lora_dropout: 0.05
    lora_target_linear: true
    peft_use_rslora: false
    learning_rate: 2e-4
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankwise.errors import ConfigError
from rankwise.report.export import TOOL_NAMES, Exported, export

__all__ = ["Merged", "merge_into", "merged_path"]

# Keys the answer replaces even when it does not set them: a stale per-module pattern
# would override the answer's ranks.
STALE = {"axolotl": ("lora_rank_pattern", "lora_alpha_pattern")}
# What the tool trains with where the file leaves a training key out: a search that used
# the same needs no note.
TOOL_DEFAULTS = {
    "axolotl": {"lr_scheduler": "cosine"},
    "llama-factory": {"lr_scheduler_type": "linear"},
    "trl": {"lr_scheduler_type": "linear"},
}


@dataclass
class Merged:
    """Where the merged file went, and the notes for the user (what the tool could not
    take; for JSON, what a YAML file would hold as comments)."""

    path: Path
    notes: list[str] = field(default_factory=list)


def merged_path(file: str | Path) -> Path:
    """The default output: ``recipe.yml`` -> ``recipe.rankwise.yml``, beside it."""
    p = Path(file)
    return p.with_name(f"{p.stem}.rankwise{p.suffix}")


def merge_into(run_dir, tool: str, file, output=None, in_place: bool = False) -> Merged:
    """Write ``file`` with the run's answer in ``tool``'s LoRA keys to ``output`` (default
    :func:`merged_path`), or back to ``file`` with ``in_place``."""
    if tool == "peft":
        raise ConfigError(
            "--merge-into: needs --to axolotl, llama-factory or trl (a training config)"
        )
    src = Path(file)
    if in_place and output is not None:
        raise ConfigError("--in-place: writes back to the --merge-into file; drop --output")
    dest = src if in_place else Path(output) if output else merged_path(src)
    if dest.resolve() == src.resolve() and not in_place:
        raise ConfigError(f"--output: {dest} is the --merge-into file; pass --in-place")
    exported = export(run_dir, tool)
    is_json = src.suffix.lower() == ".json"
    data, dump = _load(src, is_json)
    _check_tool(data, tool, src)
    notes = _apply(data, exported, tool, is_json)
    try:
        dest.write_text(dump(data), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--output: cannot write {dest} ({exc.strerror})") from None
    return Merged(dest, notes)


def _load(src: Path, is_json: bool):
    """(the file's mapping, a function that writes it back as text)."""
    if not src.is_file():
        raise ConfigError(f"--merge-into: file {src} does not exist")
    text = src.read_text(encoding="utf-8")
    if is_json:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--merge-into: {src}, line {exc.lineno}: malformed JSON") from None
        return _mapping(data, src), lambda d: json.dumps(d, indent=2) + "\n"
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError
    from ruamel.yaml.util import load_yaml_guess_indent

    try:
        data, indent, block_seq_indent = load_yaml_guess_indent(text)
    except YAMLError:
        raise ConfigError(f"--merge-into: {src}: not a YAML file") from None
    yaml = YAML()  # round trip: comments, order, quoting and indentation kept
    yaml.preserve_quotes = True
    yaml.width = 4096  # never re-wrap the user's long lines
    yaml.indent(mapping=indent or 2, sequence=indent or 2, offset=block_seq_indent or 0)
    data = yaml.load(text)

    def dump(d) -> str:
        out = io.StringIO()
        yaml.dump(d, out)
        return out.getvalue()

    return _mapping(data, src), dump


def _mapping(data: Any, src: Path):
    if not isinstance(data, dict):
        raise ConfigError(f"--merge-into: {src}: expected a mapping of training keys")
    return data


def _check_tool(data, tool: str, src: Path) -> None:
    from rankwise.io.recipes import tool_evidence

    found, key = tool_evidence(data)
    if found is not None and found != tool:
        raise ConfigError(
            f"--merge-into {src}: {key} is {TOOL_NAMES[found]}'s key: the file is "
            f"{TOOL_NAMES[found]}'s config, not {TOOL_NAMES[tool]}'s (use --to {found})"
        )


def _apply(data, exported: Exported, tool: str, is_json: bool) -> list[str]:
    """Set the LoRA keys in ``data``; returns the notes (JSON: also the comments)."""
    names = list(data)
    have = [k for k in exported.keys if k in data]
    at = max((names.index(k) for k in have), default=len(names) - 1) + 1
    last = names[at - 1] if names else None
    for key, value in exported.keys.items():
        if key in data or is_json:
            data[key] = value
        else:
            data.insert(at, key, value)
            at += 1
    if not is_json and last is not None and list(data)[at - 1] != last:
        _move_trailing(data, last, list(data)[at - 1])
    removed = [k for k in STALE.get(tool, ()) if k in data and k not in exported.keys]
    for key in removed:
        del data[key]
    # the first clause of the reason: the rest (how the search stopped) is in the run
    head = exported.comments[0].replace("LoRA settings recommended by rankwise", "rankwise")
    comments = [head.split("; ")[0]]
    comments += [c for c in exported.comments[1:] if not c.startswith("Merge these keys")]
    comments += [f"{k} removed: the answer sets no per-module ranks" for k in removed]
    has = {k: data.get(k, TOOL_DEFAULTS[tool].get(k)) for k in exported.setup}
    comments += [
        f"the search used {k}: {json.dumps(v)}; this file has {json.dumps(has[k])}"
        for k, v in exported.setup.items()
        if has[k] != v and k not in ("adapter", "finetuning_type")
    ]
    notes = [f"not applied: {n}" for n in exported.notes]
    if not is_json and exported.keys:
        first = next(k for k in data if k in exported.keys)
        data.yaml_set_comment_before_after_key(first, before="\n".join(comments))
        return notes
    return notes + comments[1:]  # JSON holds no comments: they come back as notes


def _move_trailing(data, after: str, to: str) -> None:
    """The blank lines and comments that followed ``after`` now follow ``to``, the last key
    inserted behind it (``after`` keeps its own end-of-line comment): the inserted keys
    join the block they extend instead of opening the next one."""
    from ruamel.yaml.tokens import CommentToken

    token = data.ca.items.get(after, [None] * 4)[2]
    if token is None:
        return
    value = token.value
    eol = value[: value.index("\n") + 1] if value.startswith("#") and "\n" in value else ""
    rest = value[len(eol) :] if eol else value[1:]
    if not rest:
        return
    if eol:
        token.value = eol
    else:
        data.ca.items[after][2] = None
    data.ca.items.setdefault(to, [None] * 4)[2] = CommentToken("\n" + rest, token.start_mark)
