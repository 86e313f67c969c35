"""Planted-rank tasks, second family: a tiny Qwen3 base, a decaying planted spectrum.

Like ``bench/planted.py`` (read it first), a base model gets a rank-k update ΔW on some
modules, the result is the *teacher*, and sequences sampled from the teacher become the
data; a LoRA student on the base can match the teacher exactly at rank k. This family
changes the three things a rank search could overfit to in the first one:

- **Base.** A 3-layer Qwen3 (hidden 96, or 128 when k > 12) with grouped-query attention
  (4 query heads, 2 key/value heads: k_proj and v_proj map hidden -> hidden/2), RMSNorm on
  each head's queries and keys, SwiGLU width 3·hidden, and biases on q/k/v/o drawn at
  random with the weights' init std, 0.02 (they initialise at zero, which would leave the
  bias path dead; at std 0.1 o_proj's bias alone writes a constant of norm ~1 into the
  residual stream per layer). The first family is a 2-layer bias-free Llama with square
  attention projections. Not Qwen2: transformers 5's AutoTokenizer replaces the tokenizer
  class of any ``qwen2`` checkpoint by ``Qwen2Tokenizer``, whose byte-level rules drop the
  character tokenizer's whitespace ("a", newline, "b", space, "c" -> 3 ids), so a trainer
  would read other data than the teacher sampled. The round-trip check below loads the
  tokenizer the way a trainer does, so such a mismatch fails the generation.
- **Planting.** Every linear module (q, k, v, o, gate, up, down) gets the update, with a
  *decaying* spectrum: singular values σᵢ ∝ ρⁱ, i = 0..k-1, ρ = ``tail``^(1/(k-1)), so the
  k-th direction has ``tail`` (1/4) of the first one's weight whatever k is, and the shape of
  the spectrum does not change with k. ΔW = gain·‖W‖_F·U·diag(σ)·Vᵀ with ‖σ‖₂ = 1, hence
  ‖ΔW‖_F = gain·‖W‖_F. The first family plants a flat spectrum on q/v/up/down only: every
  direction is worth the same. Learned updates concentrate in their top singular directions
  (LoRA, arXiv 2106.09685, §7), so here the last directions buy less loss than the first
  and the knee is softer, as a rank search meets it in practice.
  ``gain`` is not a constant: it is *calibrated* per task, by bisection on log(gain), so
  that the teacher beats the base by ``gap`` nats/character (0.75) on a calibration sample
  of the teacher's own records. The gap of a fixed gain moves with k, hidden size and the
  module set; a calibrated one keeps every task of the family equally hard.
- **Data.** Records of 63 characters (seq_len 64: a batch of 16 blocks is 16 records, one
  per row), sampled at temperature 0.9. The temperature is folded into the LM head of both
  base and teacher (logits/τ = a head scaled by 1/τ), and the tempered teacher is sampled at
  temperature 1. Sampling a teacher at τ ≠ 1 otherwise yields data that no LoRA on the
  target modules reproduces exactly (it would also have to rescale every logit), and the
  rank curve would keep falling past k.

Why the LM head is ×5.5, not ×10 as in the first family: at a fixed gap the head's scale
sets how far the teacher's hidden states must move. With ×10 a gain of ~1.5 reaches 0.75
nats, the layers' residual writes grow only ~2.5× over the base's, the teacher is a small
perturbation of the base, and a rank-2 student matched it as well as rank 32 did (k=8,
300 steps: r=2/8/32 within 0.01 nats of each other). With ×5.5 the calibrated gain is ~2.7 and the
planted update dominates the writes (~8× the base's; in the first family gain 8 gives
~15×), so a student must rebuild the planted directions themselves.

Kept from the first family, because they make the task well-posed: embeddings ×10 (a
random tiny model is otherwise near-uniform and a planted ΔW barely moves it); the
*bias channel* (residual dimension 0 held at 1, nothing writes to it, the planted updates of
o_proj and down_proj included; the LM-head rows of non-character ids read it with weight -30,
so sampling restricted to the 96 character ids that round-trip through the tokenizer loses
nothing a student could learn); EOS reading the bias channel with a weight calibrated so
that p(EOS) ≈ 1/(seq_chars + 1) at every position, base and teacher alike, so the one EOS a
trainer appends per record costs the same at every rank and does not dominate the loss.

Layout of one task (the first family's, plus a top-level ``targets`` list)::

    bench/.cache/planted2-k8/
        model/               the BASE model (safetensors) and the character tokenizer
        train.jsonl          {"text": ...}, one sampled sequence (63 characters) per record
        val.jsonl
        planted.safetensors  the planted U, V and singular values per module
        task.json            parameters, sizes, losses, hashes, usage.seq_len, targets

Every file is a pure function of the parameters: rerunning writes the same bytes, and a
folder whose ``task.json`` records the same parameters is reused as is.

Usage::

    python -m bench.planted2 --k 2 8 32         # full tasks (seconds each)
    python -m bench.planted2 --k 2 --smoke      # tiny task, for tests
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.planted import (
    CACHE,
    EOS,
    add_bias_channel,
    check_fields,
    check_round_trip,
    cli,
    data_meta,
    decode,
    is_cached,
    mean_nll,
    module_types,
    one_thread,
    opt,
    sample,
    val_losses,
    with_update,
    write_files,
)
from bench.planted import directions as _directions
from bench.planted import task_name as _task_name
from rankwise.testing import TINY_VOCAB

ROOT = Path(__file__).resolve().parent

__all__ = [
    "Planted2Params",
    "task_name",
    "make_task",
    "build_base",
    "directions",
    "plant",
    "calibrate_gain",
    "sample",
    "spectrum",
    "main",
    "TARGETS",
    "SMOKE",
]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CALIBRATION = {"records": 32, "steps": 12, "lo": 0.125, "hi": 32.0}  # bisection on log(gain)
VERSION = 1  # bump when the generator changes, so cached tasks are rebuilt
SMOKE = {"n_train": 48, "n_val": 16, "seq_chars": 31, "hidden": 64, "layers": 2}


@dataclass(frozen=True)
class Planted2Params:
    """Everything that determines a task of this family; 0 means 'choose from k'."""

    k: int = opt(4, "Rank of the planted update (the answer a rank search should find).")
    hidden: int = opt(0, "Hidden size; 0 = 96 if 4k <= 48 else 128 (k/v maps have hidden/2).")
    layers: int = opt(3, "Transformer layers of the tiny Qwen3.")
    seq_chars: int = opt(63, "Characters per record; train with seq_len = seq_chars + 1.")
    n_train: int = opt(2048, "Training records.")
    n_val: int = opt(256, "Validation records.")
    base_seed: int = opt(10, "Seed of the base model's random initialisation.")
    plant_seed: int = opt(11, "Seed of the planted directions U, V.")
    data_seed: int = opt(12, "Seed of sampling (train: it, val: it + 1, calibration: it + 2).")
    embed_scale: float = opt(10.0, "Factor on the embeddings (outputs peaked, not uniform).")
    head_scale: float = opt(5.5, "Factor on the LM head (before the temperature).")
    tail: float = opt(0.25, "σ_k/σ_1 of the planted spectrum (geometric decay); 1 = flat.")
    gap: float = opt(0.75, "Base-minus-teacher loss (nats/char) the gain is calibrated to.")
    gain: float = opt(0.0, "ΔW = gain·‖W‖_F·U·diag(σ)·Vᵀ, ‖σ‖=1; 0 = calibrated to --gap.")
    temperature: float = opt(0.9, "Sampling temperature, folded into the LM head.")
    bias_std: float = opt(0.02, "Std of the random q/k/v/o biases of the base.")
    version: int = opt(VERSION, "Generator version (part of the cache key).")
    modules: str = opt(
        "",
        "Module types that get the update (and that a student adapts), joined by '+'; "
        "'' = every type in TARGETS.",
    )

    def __post_init__(self):
        check_fields(self, TARGETS)
        hidden = self.hidden or (96 if 4 * self.k <= 48 else 128)
        object.__setattr__(self, "hidden", hidden)
        if hidden % 8 or self.k > hidden // 2:
            raise ValueError(
                f"--hidden {hidden}: must be a multiple of 8 with hidden/2 >= k ({self.k})"
            )
        if not 0 < self.tail <= 1:
            raise ValueError(f"--tail: must be in (0, 1], got {self.tail}")
        if self.temperature <= 0 or self.gap <= 0 or self.gain < 0:
            raise ValueError("--temperature and --gap must be > 0, --gain >= 0")

    def targets(self) -> tuple[str, ...]:
        """The module types that get the update."""
        return module_types(self.modules, TARGETS)

    def key(self) -> dict:
        """The cache key: every field."""
        return dataclasses.asdict(self)


def qwen3_config(p: Planted2Params):
    """The base's architecture: Qwen3 with grouped-query attention, biases and SwiGLU."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=TINY_VOCAB,
        hidden_size=p.hidden,
        intermediate_size=3 * p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=p.hidden // 4,  # Qwen3's default is 128, whatever the hidden size
        attention_bias=True,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=EOS,
        tie_word_embeddings=False,
    )


def build_base(p: Planted2Params):
    """The tiny Qwen3 with random attention biases, scaled embeddings, a tempered head and
    a constant bias channel (dimension 0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(p.base_seed)
    model = AutoModelForCausalLM.from_config(qwen3_config(p)).eval()
    gen = torch.Generator().manual_seed(p.base_seed)
    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.bias.copy_(p.bias_std * torch.randn(proj.bias.shape, generator=gen))
    # sampling at τ == a head scaled by 1/τ; add_bias_channel zeroes o_proj's bias on dim 0
    return add_bias_channel(model, p, head_scale=p.head_scale / p.temperature)


def spectrum(k: int, tail: float) -> torch.Tensor:
    """Singular values σᵢ = ρⁱ (ρ = tail^(1/(k-1))), scaled to ‖σ‖₂ = 1.

    >>> [round(s, 3) for s in spectrum(3, 0.25).tolist()]
    [0.873, 0.436, 0.218]
    """
    rho = tail ** (1 / (k - 1)) if k > 1 else 1.0
    s = rho ** torch.arange(k, dtype=torch.float64)
    return (s / s.norm()).float()


def directions(base, p: Planted2Params) -> dict:
    """The planted directions {module: (U, V, ‖W‖_F)}; U, V have orthonormal columns."""
    return _directions(base, p.targets(), p.k, p.plant_seed)


def plant(base, p: Planted2Params, gain: float, dirs: dict | None = None):
    """The teacher (a copy of ``base``) with ΔW = gain·‖W‖_F·U·diag(σ)·Vᵀ on every target,
    and the factors {module: (U, V, σ·gain·‖W‖_F)}."""
    dirs = dirs if dirs is not None else directions(base, p)
    s = spectrum(p.k, p.tail)
    factors = {name: (u, v, gain * norm * s) for name, (u, v, norm) in dirs.items()}
    return with_update(base, factors), factors


def calibrate_gain(base, p: Planted2Params, dirs: dict) -> tuple[float, float]:
    """The gain whose teacher beats the base by ``p.gap`` nats/character on its own samples
    (bisection on log(gain)); returns (gain, the gap measured at it)."""
    c = CALIBRATION
    lo, hi = math.log(c["lo"]), math.log(c["hi"])
    for _ in range(c["steps"]):
        gain = math.exp((lo + hi) / 2)
        gap = _gap(base, p, gain, dirs)
        lo, hi = (math.log(gain), hi) if gap < p.gap else (lo, math.log(gain))
    gain = math.exp((lo + hi) / 2)
    gap = _gap(base, p, gain, dirs)
    if abs(gap - p.gap) > 0.1 * p.gap:  # the bisection ended at a bound: out of reach
        raise ValueError(
            f"--gap {p.gap}: no gain in [{c['lo']}, {c['hi']}] reaches it (gap {gap:.3f} at "
            f"gain {gain:.3g}); small models saturate: raise --hidden or --head-scale"
        )
    return gain, gap


def _gap(base, p: Planted2Params, gain: float, dirs: dict) -> float:
    teacher, _ = plant(base, p, gain, dirs)
    ids = sample(teacher, CALIBRATION["records"], p.seq_chars, seed=p.data_seed + 2)
    return mean_nll(base, ids) - mean_nll(teacher, ids, masked=True)


def _build(p: Planted2Params) -> dict:
    """Base, teacher, factors, samples and losses, all on one thread. The teacher is
    sampled at temperature 1: its head already holds the temperature."""
    with one_thread():
        base = build_base(p)
        dirs = directions(base, p)
        gain, cal_gap = (p.gain, None) if p.gain else calibrate_gain(base, p, dirs)
        teacher, factors = plant(base, p, gain, dirs)
        train = sample(teacher, p.n_train, p.seq_chars, seed=p.data_seed)
        val = sample(teacher, p.n_val, p.seq_chars, seed=p.data_seed + 1)
        losses = val_losses(base, teacher, train, val)
    return {"base": base, "factors": factors, "train": train, "val": val, "losses": losses,
            "gain": gain, "calibration_gap": cal_gap}  # fmt: skip


def _write(out: Path, built: dict) -> dict:
    """Write model/, planted.safetensors, train.jsonl, val.jsonl; return their hashes.
    The records are checked with the tokenizer a trainer gets from
    ``AutoTokenizer.from_pretrained(model/)``, which may not be the saved class."""
    from transformers import AutoTokenizer

    texts = {s: decode(built[s]) for s in ("train", "val")}
    sha = write_files(out, built["base"], built["factors"], texts, s_name="sigma")
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    for split in ("train", "val"):
        check_round_trip(tokenizer, texts[split], built[split])
    return sha


def _describe(p: Planted2Params, built: dict, sha: dict) -> dict:
    kv = p.hidden // 2  # 2 of 4 heads: k_proj and v_proj map hidden -> hidden/2
    meta = {
        "name": f"planted2-k{p.k}",
        "k": p.k,
        "params": p.key(),
        "targets": list(p.targets()),
        "model": {
            "architecture": "Qwen3ForCausalLM",
            "hidden": p.hidden,
            "intermediate": 3 * p.hidden,
            "layers": p.layers,
            "heads": 4,
            "kv_heads": 2,
            "vocab": TINY_VOCAB,
            "target_modules": list(p.targets()),
            "planted_modules": list(p.targets()),
            "max_rank": kv,  # min(in, out) over the target modules: k_proj, v_proj
        },
    }
    planting = {
        "delta": "W += gain*||W||_F * U @ diag(sigma) @ V.T, U and V orthonormal (k "
        "columns), sigma_i ~ rho**i with sigma_k/sigma_1 = tail, ||sigma|| = 1",
        "spectrum": [round(s, 6) for s in spectrum(p.k, p.tail).tolist()],
        "gain": built["gain"],
        "calibration": CALIBRATION | {"gap": built["calibration_gap"]},
    }
    note = (
        "folded into the saved base's LM head (x 1/temperature); "
        "the tempered teacher is sampled at temperature 1"
    )
    data = data_meta(p, planting, temperature_note=note)
    return meta | data | {"losses": built["losses"], "sha256": sha}


def task_name(k: int, modules: str = "") -> str:
    """``planted2-k8``, or ``planted2-k8-k_proj-o_proj`` when only some types get the update."""
    return _task_name(k, modules, family="planted2")


def make_task(k: int, out_dir: str | Path | None = None, force: bool = False, **params) -> Path:
    """Generate (or reuse) the task of this family for rank ``k``; return its folder.

    ``params`` are :class:`Planted2Params` fields (e.g. ``**SMOKE``). The folder defaults to
    ``bench/.cache/`` + :func:`task_name`. Example::

        >>> path = make_task(2, "/tmp/planted2-doc", **SMOKE)  # doctest: +SKIP
        >>> sorted(p.name for p in path.iterdir())
        ['model', 'planted.safetensors', 'task.json', 'train.jsonl', 'val.jsonl']
    """
    p = Planted2Params(k=k, **params)
    out = Path(out_dir) if out_dir is not None else CACHE / task_name(k, p.modules)
    if not force and is_cached(out, p):
        return out
    built = _build(p)
    meta = _describe(p, built, _write(out, built))
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _summary(meta: dict) -> str:
    loss, gen = meta["losses"], meta["generation"]
    return (
        f"hidden {meta['model']['hidden']}, gain {gen['gain']:.3g}, base "
        f"{loss['base_val']:.3f} -> teacher {loss['teacher_val']:.3f} nats/char on val "
        f"(with EOS {loss['base_val_with_eos']:.3f} -> {loss['teacher_val_with_eos']:.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    return cli(argv, __doc__, Planted2Params, SMOKE, task_name, make_task, _summary)


if __name__ == "__main__":
    raise SystemExit(main())
