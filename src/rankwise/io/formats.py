"""Record formats: which one a record is, and how it becomes tokens with a loss mask.

``--format`` (``auto``: the first record's fields decide, in this order):

- ``messages`` (``{"messages": [{"role", "content"}, ...]}``): the tokenizer's chat
  template; loss on assistant turns only.
- ``sharegpt`` (``{"conversations": [{"from", "value"}, ...]}``, ``from`` one of
  ``human``, ``gpt``, ``system``; ``user``/``assistant`` are read as ``human``/``gpt``):
  turned into messages and rendered like them; loss on the ``gpt`` turns only. This is
  the layout axolotl maps with ``message_property_mappings: {role: from, content: value}``
  and LLaMA-Factory reads as ``formatting: sharegpt``.
- ``alpaca`` (``instruction``, ``output``; optional ``input`` and ``system``): the
  Stanford Alpaca prompt, written as axolotl's ``type: alpaca`` writes it; loss on the
  output only. With a non-empty ``input``::

      Below is an instruction that describes a task, paired with an input that provides
      further context. Write a response that appropriately completes the request.

      ### Instruction:
      {instruction}

      ### Input:
      {input}

      ### Response:
      {output}</s>

  (the preamble is one line; it is wrapped here). With an empty or missing ``input`` the
  preamble is "Below is an instruction that describes a task. Write a response that
  appropriately completes the request." and the ``### Input:`` section is left out. A
  non-empty ``system`` field replaces the preamble.
- ``prompt_completion`` (``prompt``, ``completion``): loss on the completion only.
- ``text`` (``text``): loss on every token.

Every example ends with EOS. Field names other than alpaca's are flags
(``--text-field``, ``--messages-field``, ``--conversations-field``, ...).

Example:
    >>> from rankwise.config import DataConfig
    >>> from rankwise.testing import make_tokenizer
    >>> record = {"instruction": "Say hi", "output": "hi"}
    >>> record_format(record, DataConfig())
    'alpaca'
    >>> ((ids, labels),) = render_batch([record], "alpaca", make_tokenizer(), DataConfig())
    >>> make_tokenizer().decode([t for t in labels if t != IGNORE])
    'hi</s>'
"""

from __future__ import annotations

from typing import Any

from rankwise.config import DataConfig
from rankwise.errors import ConfigError

__all__ = [
    "FORMATS",
    "IGNORE",
    "alpaca_prompt",
    "record_format",
    "RecordChecker",
    "render_batch",
]

IGNORE = -100  # the label value torch's cross-entropy skips
FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")  # detection order

ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request."
)
ALPACA_PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


def _fields(fmt: str, cfg: DataConfig) -> list[str]:
    """The fields a record of ``fmt`` must have."""
    return {
        "text": [cfg.text_field],
        "prompt_completion": [cfg.prompt_field, cfg.completion_field],
        "alpaca": ["instruction", "output"],
        "messages": [cfg.messages_field],
        "sharegpt": [cfg.conversations_field],
    }[fmt]


def record_format(record: dict, cfg: DataConfig) -> str | None:
    """The first format (in :data:`FORMATS` order) whose fields the record has."""
    return next((f for f in FORMATS if all(k in record for k in _fields(f, cfg))), None)


class RecordChecker:
    """Checks records one at a time: all must have one format, the first's under ``auto``.

    Call it with each record and where it sits (``"line 7"``, ``"record 7"``); it raises
    :class:`ConfigError` naming ``source`` and that place, and :attr:`format` holds the
    format once a record has been seen.
    """

    def __init__(self, cfg: DataConfig, source: str):
        self.cfg, self.source = cfg, source
        self.format = None if cfg.format == "auto" else cfg.format
        self.first = None  # where the record that fixed the format sits

    def __call__(self, record: Any, where: str) -> None:
        if not isinstance(record, dict):
            raise ConfigError(
                f"{self.source}, {where}: expected a JSON object, got {type(record).__name__}"
            )
        if self.format is None:
            self.format, self.first = record_format(record, self.cfg), where
            if self.format is None:
                c = self.cfg
                raise ConfigError(
                    f"{self.source}, {where}: records have fields {_keys(record)}; expected "
                    f"{c.text_field!r}, {c.prompt_field!r}+{c.completion_field!r}, "
                    f"'instruction'+'output' (alpaca), {c.messages_field!r} or "
                    f"{c.conversations_field!r} (rename with --text-field etc.)"
                )
        need = _fields(self.format, self.cfg)
        if not all(k in record for k in need):
            self._wrong_fields(record, where, need)
        if self.format == "sharegpt":
            problem = _conversation_problem(record[self.cfg.conversations_field])
            if problem:
                raise ConfigError(
                    f"{self.source}, {where}: {self.cfg.conversations_field}{problem}"
                )

    def _wrong_fields(self, record: dict, where: str, need: list[str]):
        at, other = f"{self.source}, {where}", record_format(record, self.cfg)
        if other is not None and self.first is not None:
            raise ConfigError(
                f"{at}: a {other} record (fields {_keys(record)}), but {self.first} is "
                f"{self.format}; every record of a file must have one format "
                f"(expected fields {', '.join(need)})"
            )
        missing = ", ".join(k for k in need if k not in record)
        raise ConfigError(f"{at} has no field {missing} (fields found: {_keys(record)})")


def _keys(record: dict) -> str:
    return ", ".join(map(str, record))


def _conversation_problem(turns: Any) -> str | None:
    if not isinstance(turns, list):
        return f": expected a list of {{from, value}} turns, got {type(turns).__name__}"
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return f"[{j}]: expected an object with 'from' and 'value', got {turn!r:.60}"
        if turn["from"] not in SHAREGPT_ROLES:
            return f"[{j}]: from {turn['from']!r}; expected human, gpt or system"
        if not isinstance(turn["value"], str):
            return f"[{j}]: value is {type(turn['value']).__name__}; expected a string"
    return None


# -- rendering --------------------------------------------------------------------------------
def alpaca_prompt(record: dict) -> str:
    """The alpaca prompt of a record: everything before its output (see the module doc)."""
    given = record.get("input")
    given = "" if given is None else str(given)
    system = record.get("system")
    preamble = str(system) if system else ALPACA_PREAMBLE if given else ALPACA_PREAMBLE_NO_INPUT
    prompt = f"{preamble}\n\n### Instruction:\n{record['instruction']}\n\n"
    if given:
        prompt += f"### Input:\n{given}\n\n"
    return prompt + "### Response:\n"


def _messages(record: dict, fmt: str, cfg: DataConfig) -> list[dict]:
    if fmt == "messages":
        return record[cfg.messages_field]
    return [
        {"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]}
        for t in record[cfg.conversations_field]
    ]


def render_batch(
    records: list[dict], fmt: str, tokenizer, cfg: DataConfig, where: list[str] | None = None
) -> list[tuple[list[int], list[int]]]:
    """Token ids and labels (``IGNORE`` where no loss) of each record.

    Text and prompt/completion records are tokenised in one batched call (a fast
    tokenizer encodes a batch exactly as it encodes each string alone).
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "text":
        ids = tokenizer([str(r[cfg.text_field]) for r in records])["input_ids"]
        return [(x + eos, x + eos) for x in ids]
    if fmt in ("prompt_completion", "alpaca"):
        if fmt == "alpaca":
            prompts = [alpaca_prompt(r) for r in records]
            completions = [str(r["output"]) for r in records]
        else:
            prompts = [str(r[cfg.prompt_field]) for r in records]
            completions = [str(r[cfg.completion_field]) for r in records]
        p_ids = tokenizer(prompts)["input_ids"]
        c_ids = tokenizer(completions, add_special_tokens=False)["input_ids"]
        return [
            (p + c + eos, [IGNORE] * len(p) + c + eos) for p, c in zip(p_ids, c_ids, strict=True)
        ]
    out = []
    for i, record in enumerate(records):
        try:
            out.append(render_chat(_messages(record, fmt, cfg), tokenizer, fmt))
        except ConfigError as exc:
            raise ConfigError(f"{where[i]}: {exc}" if where else str(exc)) from None
    return out


def render_chat(messages: list[dict], tokenizer, fmt: str = "messages"):
    """Chat template rendering; labels only on the characters of assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--format {fmt}: the tokenizer has no chat template")
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, m in enumerate(messages):
            if m.get("role") == "assistant":
                start = (
                    len(
                        tokenizer.apply_chat_template(
                            messages[:i], tokenize=False, add_generation_prompt=True
                        )
                    )
                    if i
                    else 0
                )
                end = len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))
                spans.append((start, end))
    except Exception as exc:  # jinja raises TemplateError, templates raise their own
        raise ConfigError(f"the chat template cannot render it ({exc})") from None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= a and b <= e for s, e in spans) and b > a else IGNORE
        for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels
