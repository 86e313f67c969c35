"""Tiny models and tokenizers built in-process, for tests, benchmarks and examples.

Nothing is downloaded: a character-level tokenizer over printable ASCII and a
2-layer, hidden-64 Llama or GPT-2 built from a config with a fixed seed.

Example:
    >>> import tempfile
    >>> path = save_tiny_model(tempfile.mkdtemp(), "llama")
    >>> sorted(p.name for p in path.iterdir())[:2]
    ['chat_template.jinja', 'config.json']
"""

from __future__ import annotations

import string
from pathlib import Path

__all__ = ["make_tokenizer", "tiny_model", "save_tiny_model", "TINY_VOCAB", "CHAT_TEMPLATE"]

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
    """A randomly initialised causal LM of the given architecture ('llama' or 'gpt2');
    ``config`` overrides fields of its config (e.g. ``attention_bias=True``)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

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
