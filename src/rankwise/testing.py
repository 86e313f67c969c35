"""Tiny models and tokenizers built in-process, for tests, benchmarks and examples.

Nothing is downloaded: a character-level tokenizer over printable ASCII and a
2-layer, hidden-64 Llama, GPT-2 or Qwen3-MoE built from a config with a fixed seed, a BERT-style
encoder for sequence classification, and a labelled text set read from the Python
standard library (:func:`stdlib_topics`).

Example:
    >>> import tempfile
    >>> path = save_tiny_model(tempfile.mkdtemp(), "llama")
    >>> sorted(p.name for p in path.iterdir())[:2]
    ['chat_template.jinja', 'config.json']
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path

from rankwise.records import COMPLETE, SKIPPED, TrialResult, TrialSpec
from rankwise.run.parallel import Arrival, lost_result

__all__ = [
    "make_tokenizer",
    "tiny_model",
    "save_tiny_model",
    "save_tiny_adapter",
    "tiny_encoder",
    "save_tiny_encoder",
    "stdlib_topics",
    "TINY_VOCAB",
    "CHAT_TEMPLATE",
    "FakePool",
    "FakeRunner",
]

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHARS = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline
TINY_VOCAB = 128

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def make_tokenizer():
    """A fast character-level tokenizer (ids 0-3 special, then printable ASCII)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_model(arch: str = "llama", seed: int = 0, hidden: int = 64, layers: int = 2, **config):
    """A randomly initialised causal LM of the given architecture ('llama', 'gpt2', or
    'qwen3_moe': a mixture of 4 experts per layer, top-2);
    ``config`` overrides fields of its config (e.g. ``attention_bias=True``)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen3MoeConfig

    if arch == "llama":
        config = LlamaConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            tie_word_embeddings=False,
            **config,
        )
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=TINY_VOCAB,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            **config,
        )
    elif arch == "qwen3_moe":  # fused experts: mlp.experts.gate_up_proj (E, 2f, d), down_proj
        config = Qwen3MoeConfig(
            vocab_size=TINY_VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            moe_intermediate_size=hidden // 2,
            num_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=hidden // 4,
            max_position_embeddings=512,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            tie_word_embeddings=False,
            **config,
        )
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **kw) -> Path:
    """Write a tiny model and its tokenizer to ``path`` (safetensors), loadable offline."""
    path = Path(path)
    tiny_model(arch, seed, **kw).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def save_tiny_adapter(
    path: str | Path,
    arch: str = "llama",
    ranks: dict[str, int] | None = None,
    seed: int = 0,
    **lora,
) -> Path:
    """Write a plain PEFT LoRA adapter of a tiny model whose updates ``B @ A`` have planted ranks.

    ``ranks`` maps a module type (the last part of its name, e.g. ``"q_proj"``) to the rank
    of its update: ``k`` orthonormal directions of equal weight, so every energy share
    short of 100% needs all ``k``. Other modules get a full-rank update. ``lora`` holds
    ``LoraConfig`` keywords (default: ``r=8``, all linear layers; GPT-2's Conv1D layers
    with ``fan_in_fan_out=True``, as PEFT would set it). Written by
    ``get_peft_model(...).save_pretrained(path)``: nothing rankwise-specific.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    defaults = {"r": 8, "target_modules": "all-linear", "fan_in_fan_out": arch == "gpt2"}
    peft_model = get_peft_model(tiny_model(arch, seed), LoraConfig(**{**defaults, **lora}))
    gen = torch.Generator().manual_seed(seed)

    def orthonormal(rows: int, cols: int) -> torch.Tensor:  # orthonormal columns
        return torch.linalg.qr(torch.randn(rows, cols, generator=gen))[0]

    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if "default" not in getattr(module, "lora_A", {}):
                continue
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            k = (ranks or {}).get(name.rsplit(".", 1)[-1], a.shape[0])
            if not 0 <= k <= a.shape[0]:
                raise ValueError(f"planted rank {k} of {name} is outside [0, r={a.shape[0]}]")
            a.copy_(orthonormal(a.shape[1], a.shape[0]).T)
            b.zero_()
            b[:, :k] = orthonormal(b.shape[0], k)
    peft_model.save_pretrained(path)
    return Path(path)


# -- stand-ins for the parallel search (rankwise.run.executor), without torch -------------------
class FakeRunner:
    """A :class:`~rankwise.run.runner.TrialRunner` stand-in over a dict store (no torch)."""

    def __init__(self, skip: Callable[[int], str | None] = lambda rank: None):
        self.store, self.skip, self.recorded = _FakeStore(), skip, []
        self.progress = _FakeProgress()

    def spec_for(self, rank: int, seed: int, variant=None) -> TrialSpec:
        return TrialSpec(f"r{rank}-s{seed}", rank, seed, {"r": rank, "lora_alpha": 16}, {}, {}, "")

    def prepare(self, rank, seed, variant=None, record=True):
        spec = self.spec_for(rank, seed)
        stored = self.store.result(spec.key)
        if stored is not None:
            return spec, stored, {}
        reason = self.skip(rank)
        if reason is None:
            return spec, None, {}
        result = lost_result(spec, reason).replace(status=SKIPPED)
        if record:
            self.record(result, spec)
        return spec, result, {}

    def record(self, result: TrialResult, spec: TrialSpec) -> TrialResult:
        self.store.finish(result)
        self.recorded.append(result)
        return result


class _FakeProgress:
    def __init__(self):
        self.lines: list[str] = []

    def log(self, text: str) -> None:
        self.lines.append(text)

    def trial_started(self, worker: str, spec: TrialSpec, note: str = "") -> None:
        self.log(f"{worker}: started {spec.key} {note}".strip())


class _FakeStore:
    def __init__(self):
        self.rows: dict[str, TrialResult] = {}

    def result(self, key: str) -> TrialResult | None:
        return self.rows.get(key)

    def start(self, spec: TrialSpec) -> None:
        pass

    def finish(self, result: TrialResult) -> None:
        self.rows[result.key] = result

    def annotate(self, key: str, **extra) -> TrialResult:
        merged = {**self.rows[key].extra, **extra}
        self.rows[key] = self.rows[key].replace(
            extra={k: v for k, v in merged.items() if v is not None}
        )
        return self.rows[key]

    def discard_interrupted(self) -> None:
        pass


class FakePool:
    """``slots`` workers that finish trials instantly with ``loss(spec)``; ``order`` picks
    which running trial ends next (default: the oldest)."""

    def __init__(self, slots: int, loss: Callable[[TrialSpec], float], order=None):
        self.slots, self.loss, self.order = slots, loss, order or (lambda keys: keys[0])
        self.running: dict[str, tuple[str, TrialSpec]] = {}
        self.submitted: list[str] = []
        self.cancelled: list[str] = []
        self.peak = 0

    def free(self) -> int:
        return self.slots - len(self.running)

    def submit(self, spec: TrialSpec, task: tuple = ()) -> str:
        busy = {w for w, _ in self.running.values()}
        worker = next(f"w{i}" for i in range(self.slots) if f"w{i}" not in busy)
        self.running[spec.key] = (worker, spec)
        self.submitted.append(spec.key)
        self.peak = max(self.peak, len(self.running))
        return worker

    def wait(self) -> Arrival:
        key = self.order(list(self.running))
        worker, spec = self.running.pop(key)
        loss = self.loss(spec)
        if loss is None:  # the worker died
            return Arrival(key, worker, None, "ActorDiedError: killed")
        result = TrialResult(key, spec.rank, spec.seed, COMPLETE, best_val_loss=loss)
        return Arrival(key, worker, [result])

    def cancel(self, key: str) -> None:
        self.running.pop(key)
        self.cancelled.append(key)


def tiny_encoder(seed: int = 0, hidden: int = 64, layers: int = 2):
    """A randomly initialised BERT-style encoder (no head) over the tiny vocabulary: a
    classifier's backbone, to which ``--task seq-cls`` adds a new head."""
    import torch
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return BertModel(config).eval()


def save_tiny_encoder(path: str | Path, seed: int = 0, **kw) -> Path:
    """Write a tiny BERT-style encoder and the character tokenizer to ``path``."""
    path = Path(path)
    tiny_encoder(seed, **kw).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


STDLIB_TOPICS = ("asyncio", "email", "xml")


def stdlib_topics(
    packages: tuple[str, ...] = STDLIB_TOPICS, per_label: int = 40, min_chars: int = 40
) -> list[dict]:
    """A labelled text set no one here wrote, available offline: docstrings (of modules,
    classes and functions) of the Python standard library's packages, each labelled by
    the top-level package it comes from, ``per_label`` of each in file order.

    Source: the running interpreter's standard library (``sysconfig``'s ``stdlib`` path),
    test modules left out. The texts change with the Python version, not between runs.

    Example:
        >>> rows = stdlib_topics(("json", "email"), per_label=3)
        >>> [r["label"] for r in rows], sorted(rows[0])
        (['json', 'json', 'json', 'email', 'email', 'email'], ['label', 'text'])
    """
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    rows = []
    for package in packages:
        texts: list[str] = []
        for file in sorted((root / package).rglob("*.py")):
            if {"test", "tests"} & set(file.relative_to(root).parts) or len(texts) >= per_label:
                continue
            tree = ast.parse(file.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(
                    node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
                ):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= min_chars:
                        texts.append(doc)
        if len(texts) < per_label:
            raise ValueError(f"stdlib package {package!r} has only {len(texts)} docstrings")
        rows += [{"text": t, "label": package} for t in texts[:per_label]]
    return rows


def saved_bytes(peft_model, ids) -> int:
    """Bytes autograd saves for backward in one forward pass of ``peft_model`` on ``ids``,
    parameters excluded: the activation memory a prediction is checked against. Leaves the
    gradients cleared."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in peft_model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        peft_model(input_ids=ids, labels=ids).loss.backward()
    peft_model.zero_grad(set_to_none=True)
    return sum(seen.values())
