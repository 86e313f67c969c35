"""Planted-rank tasks: data whose right LoRA rank is known, for benchmarking rank search.

A tiny Llama (the *base*) gets a rank-k update ΔW = scale·U·Vᵀ on every target module
(q_proj, v_proj, up_proj, down_proj; or only the types ``modules`` names, for a task whose
needs differ by module type); the result is the *teacher*. Sequences sampled from the
teacher become ``train.jsonl`` / ``val.jsonl``. A LoRA student on the base model can
match the teacher exactly at rank k and not below, so its validation loss should fall until
r ≈ k and then plateau.

Why the base is not the stock random tiny model (FIELD.md, "Measured on this project's
machines"): a randomly initialised tiny Llama gives near-uniform outputs and a planted ΔW of
the weights' own size barely moves them. Embeddings and LM head are scaled ×10 and ΔW is
``gain·‖W‖_F/√k`` per unit direction (gain 8 at hidden 64), which opens a gap of ~0.8 nats
between base and teacher on the teacher's own samples.

Why a *bias channel*: sampling is restricted to the character ids 4..99 so that every token
round-trips through the character tokenizer. Without help, the random base puts ~25% of its
mass on the other 32 ids, so the masked teacher would not be reachable by any LoRA on the
target modules (the student would also have to learn to suppress those ids). Residual
dimension 0 is therefore held at a constant (embedding column 0 = 1, nothing writes to it),
and the LM-head rows of the non-character ids read it with weight -30: their logits sit
below -100 in base and teacher alike, and the masked teacher is the full-vocabulary teacher.

EOS is the exception. Trainers (rankwise's ``data`` module, TRL packing, run_clm's
``group_texts``) append EOS to every record and learn to predict it, so an EOS the base finds
impossible would dominate the student's loss. Its row reads the bias channel with a weight
calibrated on the base so that p(EOS) ≈ 1/(seq_chars + 1) at every position: the cost of the
one EOS per record is then near its minimum for a model that cannot see the position (the
binary entropy, ~(ln T + 1)/T nats per token for blocks of T tokens: 0.05 at T = 128), the
same at every rank. Records are long (127 characters) to keep that offset small; with
``--seq-len 128`` each packed block is exactly one record plus its EOS, so the student sees
the same context the teacher sampled from.

Layout of one task (kept stable: benchmarks read it)::

    bench/.cache/planted-k8/
        model/               the BASE model (safetensors) and the character tokenizer
        train.jsonl          {"text": ...}, one sampled sequence (127 characters) per record
        val.jsonl
        planted.safetensors  the planted U, V and scale per module (for diagnostics)
        task.json            parameters, sizes, losses, hashes

Every file is a pure function of the parameters: rerunning writes the same bytes, and a
folder whose ``task.json`` records the same parameters is reused as is.

Usage::

    python bench/planted.py --k 2 8 32          # full tasks (a few seconds to a minute each)
    python bench/planted.py --k 2 --smoke       # tiny task, for tests
    python bench/planted.py --k 8 --modules q_proj+v_proj   # planted-k8-q_proj-v_proj
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))  # run from a checkout without installing

from rankwise.testing import CHARS, make_tokenizer, tiny_model  # noqa: E402

__all__ = [
    "PlantedParams",
    "task_name",
    "make_task",
    "build_base",
    "plant",
    "sample",
    "mean_nll",
    "main",
]

CACHE = ROOT / ".cache"
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
FIRST_CHAR, END_CHAR = 4, 4 + len(CHARS)  # character ids are 4..99; the rest is masked
EOS = 3
GEN_BATCH = 256  # sequences per sampling forward pass; fixed, since it can change float bits
VERSION = 2  # bump when the generator changes, so cached tasks are rebuilt
BIAS_READ = -30.0  # LM-head weight of non-character ids on the bias channel (logit ≈ -30·h₀)
SMOKE = {"n_train": 48, "n_val": 16, "seq_chars": 31}


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PlantedParams:
    """Everything that determines a planted-rank task; 0 means 'choose from k'."""

    k: int = _opt(4, "Rank of the planted update (the answer a rank search should find).")
    hidden: int = _opt(0, "Hidden size; 0 = 64 if 4k <= 64 else 128, so ranks up to 4k exist.")
    layers: int = _opt(2, "Transformer layers of the tiny Llama.")
    seq_chars: int = _opt(127, "Characters per record; train with seq_len = seq_chars + 1.")
    n_train: int = _opt(2048, "Training records.")
    n_val: int = _opt(256, "Validation records.")
    base_seed: int = _opt(0, "Seed of the base model's random initialisation.")
    plant_seed: int = _opt(1, "Seed of the planted directions U, V.")
    data_seed: int = _opt(2, "Seed of sampling (train uses it, val uses it + 1).")
    embed_scale: float = _opt(10.0, "Factor on the embeddings (FIELD.md: makes outputs peaked).")
    head_scale: float = _opt(10.0, "Factor on the LM head.")
    gain: float = _opt(0.0, "ΔW = gain·‖W‖_F/√k·U·Vᵀ; 0 = 512/hidden (8 at 64, 4 at 128).")
    temperature: float = _opt(1.0, "Sampling temperature of the teacher.")
    version: int = _opt(VERSION, "Generator version (part of the cache key).")
    modules: str = _opt(
        "",
        "Module types that get the update, joined by '+' (e.g. q_proj+v_proj); '' = every "
        "type in TARGETS. The others stay as in the base: a task whose needs differ by type.",
    )

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"--k: the planted rank must be >= 1, got {self.k}")
        hidden = self.hidden or (64 if 4 * self.k <= 64 else 128)
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "gain", self.gain or 512.0 / hidden)
        if hidden % 4 or self.k > hidden:
            raise ValueError(f"--hidden {hidden}: must be a multiple of 4 and >= k ({self.k})")
        for name in ("layers", "seq_chars", "n_train", "n_val"):
            if getattr(self, name) < (2 if name == "seq_chars" else 1):
                raise ValueError(f"--{name.replace('_', '-')}: too small ({getattr(self, name)})")
        if self.temperature <= 0:
            raise ValueError(f"--temperature: must be > 0, got {self.temperature}")
        unknown = [m for m in self.planted_types() if m not in TARGETS]
        if unknown or not self.planted_types():
            raise ValueError(
                f"--modules: expected types among {'+'.join(TARGETS)}, got {self.modules!r}"
            )

    def planted_types(self) -> tuple[str, ...]:
        return tuple(m for m in self.modules.split("+") if m) if self.modules else TARGETS

    def key(self) -> dict:
        """The cache key: every field, ``modules`` only when set (older tasks stay valid)."""
        d = dataclasses.asdict(self)
        if not self.modules:
            del d["modules"]
        return d


def build_base(p: PlantedParams):
    """The tiny Llama with scaled embeddings/head and a constant bias channel (dimension 0)."""
    model = tiny_model("llama", seed=p.base_seed, hidden=p.hidden, layers=p.layers)
    other = torch.ones(model.config.vocab_size, dtype=torch.bool)
    other[FIRST_CHAR:END_CHAR] = False
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(p.embed_scale)
        model.model.embed_tokens.weight[:, 0] = 1.0
        head = model.lm_head.weight
        head.mul_(p.head_scale)
        head[:, 0] = 0.0  # characters do not read the bias channel ...
        head[other] = 0.0
        head[other, 0] = BIAS_READ  # ... the other ids read it and lose
        for layer in model.model.layers:  # nothing writes to the bias channel
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        head[EOS, 0] = _eos_read(model.eval(), p)
    return model


@torch.no_grad()
def _eos_read(model, p: PlantedParams) -> float:
    """Bias-channel weight that gives EOS a logit of logsumexp(characters) - ln(seq_chars),
    i.e. p(EOS) ≈ 1/(seq_chars + 1), averaged over random character sequences."""
    gen = torch.Generator().manual_seed(p.base_seed)
    ids = torch.randint(FIRST_CHAR, END_CHAR, (64, p.seq_chars), generator=gen)
    out = model(ids, output_hidden_states=True)
    lse = out.logits[..., FIRST_CHAR:END_CHAR].logsumexp(-1).mean().item()
    h0 = out.hidden_states[-1][..., 0].mean().item()  # the normed bias channel
    return (lse - math.log(p.seq_chars)) / h0


def plant(base, p: PlantedParams):
    """The teacher (a copy of ``base``) and the planted factors {module: (U, V, scale)}."""
    teacher = copy.deepcopy(base)
    gen = torch.Generator().manual_seed(p.plant_seed)
    factors = {}
    with torch.no_grad():
        for name, module in teacher.named_modules():
            if name.rsplit(".", 1)[-1] not in p.planted_types():
                continue
            out_dim, in_dim = module.weight.shape
            u = torch.randn(out_dim, p.k, generator=gen)
            if name.endswith("down_proj"):
                u[0] = 0.0  # keep the bias channel constant in the teacher too
            u = torch.linalg.qr(u).Q
            v = torch.linalg.qr(torch.randn(in_dim, p.k, generator=gen)).Q
            scale = p.gain * module.weight.norm().item() / math.sqrt(p.k)
            module.weight += scale * u @ v.T
            factors[name] = (u, v, scale)
    return teacher.eval(), factors


def _mask(logits: torch.Tensor) -> torch.Tensor:
    """Logits with every non-character id (specials, EOS, 100..127) at -inf."""
    logits = logits.clone()
    logits[..., :FIRST_CHAR] = -math.inf
    logits[..., END_CHAR:] = -math.inf
    return logits


@torch.no_grad()
def sample(teacher, n: int, p: PlantedParams, seed: int) -> torch.Tensor:
    """``n`` sequences of ``p.seq_chars`` character ids: a uniform first character, then
    the teacher's next-token distribution (characters only, at ``p.temperature``)."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, n, GEN_BATCH):
        ids = torch.randint(FIRST_CHAR, END_CHAR, (min(GEN_BATCH, n - start), 1), generator=gen)
        # The cache goes in positionally: the keyword is past_key_values before
        # transformers 5.x and cache after; DynamicCache fills itself in place.
        cache = DynamicCache()
        logits = teacher(ids, None, None, cache, use_cache=True).logits
        for _ in range(p.seq_chars - 1):
            probs = (_mask(logits[:, -1].double()) / p.temperature).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, nxt], dim=1)
            logits = teacher(nxt, None, None, cache, use_cache=True).logits
        chunks.append(ids)
    return torch.cat(chunks)


@torch.no_grad()
def mean_nll(model, ids: torch.Tensor, masked: bool = False) -> float:
    """Mean next-token loss (nats) over positions 1..T-1, as a causal-LM student sees it.
    ``masked``: over the characters only (the teacher's sampling distribution)."""
    total = 0.0
    for chunk in ids.split(GEN_BATCH):
        logits = model(chunk).logits[:, :-1].double()
        logp = (_mask(logits) if masked else logits).log_softmax(-1)
        total += -logp.gather(-1, chunk[:, 1:, None]).sum().item()
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def with_eos(ids: torch.Tensor) -> torch.Tensor:
    """Records as a packing trainer sees them: each followed by EOS (one block per record)."""
    return torch.cat([ids, torch.full((len(ids), 1), EOS)], dim=1)


def _losses(base, teacher, train, val) -> dict:
    """Validation losses in nats/token: on the characters (the clean measure) and on
    records + EOS (what a packing trainer such as rankwise reports at seq_len seq_chars+1)."""
    return {
        "teacher_val": mean_nll(teacher, val, masked=True),
        "base_val": mean_nll(base, val),
        "teacher_val_full_vocab": mean_nll(teacher, val),
        "teacher_val_with_eos": mean_nll(teacher, with_eos(val)),
        "base_val_with_eos": mean_nll(base, with_eos(val)),
        "base_train": mean_nll(base, train),
        "uniform": math.log(END_CHAR - FIRST_CHAR),
    }


def _decode(ids: torch.Tensor) -> list[str]:
    return ["".join(CHARS[i - FIRST_CHAR] for i in row) for row in ids.tolist()]


def _check_round_trip(tokenizer, texts: list[str], ids: torch.Tensor) -> None:
    for text, row in zip(texts, ids.tolist(), strict=True):
        got = tokenizer(text).input_ids
        if got != row:
            raise AssertionError(f"tokenizer round trip failed for {text!r}: {got} != {row}")


def _write_jsonl(path: Path, texts: list[str]) -> str:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(out: Path, p: PlantedParams) -> bool:
    try:
        meta = json.loads((out / "task.json").read_text())
    except (OSError, ValueError):
        return False
    files = ("train.jsonl", "val.jsonl", "model/model.safetensors")
    return meta.get("params") == p.key() and all((out / f).exists() for f in files)


def _generate(out: Path, p: PlantedParams) -> dict:
    """Write model/, planted.safetensors, train.jsonl, val.jsonl; return task.json's body."""
    from safetensors.torch import save_file

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same float bits, hence the same samples
    try:
        base = build_base(p)
        teacher, factors = plant(base, p)
        train = sample(teacher, p.n_train, p, seed=p.data_seed)
        val = sample(teacher, p.n_val, p, seed=p.data_seed + 1)
        losses = _losses(base, teacher, train, val)
    finally:
        torch.set_num_threads(threads)
    tokenizer = make_tokenizer()
    texts = {"train": _decode(train), "val": _decode(val)}
    for split, ids in (("train", train), ("val", val)):
        _check_round_trip(tokenizer, texts[split], ids)

    out.mkdir(parents=True, exist_ok=True)
    (out / "task.json").unlink(missing_ok=True)  # written last: marks a complete folder
    base.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    tensors = {}
    for name, (u, v, scale) in factors.items():
        tensors |= {f"{name}.U": u, f"{name}.V": v, f"{name}.scale": torch.tensor(scale)}
    save_file({k: t.contiguous() for k, t in tensors.items()}, out / "planted.safetensors")
    sha = {f"{s}.jsonl": _write_jsonl(out / f"{s}.jsonl", texts[s]) for s in ("train", "val")}
    sha["model/model.safetensors"] = _sha256(out / "model" / "model.safetensors")
    sha["planted.safetensors"] = _sha256(out / "planted.safetensors")
    return {"losses": losses, "sha256": sha}


def _describe(p: PlantedParams, body: dict) -> dict:
    cfg = {"hidden": p.hidden, "intermediate": 2 * p.hidden, "layers": p.layers}
    return {
        "name": f"planted-k{p.k}",
        "k": p.k,
        "params": p.key(),
        "model": cfg
        | {
            "vocab": 128,
            "target_modules": list(TARGETS),
            "planted_modules": list(p.planted_types()),
            "max_rank": p.hidden,  # min(in, out) over the target modules
            "hidden_note": "hidden 128 for k > 16 so that ranks up to 4k exist"
            if p.hidden == 128
            else "hidden 64 (the tiny test model's size)",
        },
        "sizes": {"train": p.n_train, "val": p.n_val, "seq_chars": p.seq_chars},
        "generation": {
            "first_token": "uniform over the character ids",
            "allowed_ids": [FIRST_CHAR, END_CHAR - 1],
            "temperature": p.temperature,
            "sampling_batch": GEN_BATCH,
            "delta": "W += gain*||W||_F/sqrt(k) * U @ V.T, U and V orthonormal (k columns)",
            "bias_channel": f"residual dim 0 = 1 always; non-character ids read it x {BIAS_READ}"
            ", EOS with a weight giving p(EOS) ~ 1/(seq_chars + 1)",
            "torch": torch.__version__,
        },
        "usage": {
            "seq_len": p.seq_chars + 1,
            "note": "with EOS appended and seq_len = seq_chars + 1, each packed block is one "
            "record, the context the teacher sampled it from; compare val loss with "
            "losses.teacher_val_with_eos / base_val_with_eos",
        },
    } | body


def task_name(k: int, modules: str = "") -> str:
    """``planted-k8``, or ``planted-k8-q_proj-v_proj`` when only some types get the update."""
    return f"planted-k{k}" + (f"-{modules.replace('+', '-')}" if modules else "")


def make_task(k: int, out_dir: str | Path | None = None, force: bool = False, **params) -> Path:
    """Generate (or reuse) the planted-rank task for rank ``k``; return its folder.

    ``params`` are :class:`PlantedParams` fields. The folder defaults to
    ``bench/.cache/`` + :func:`task_name`. Example::

        >>> path = make_task(2, "/tmp/planted-doc", n_train=8, n_val=4)  # doctest: +SKIP
        >>> sorted(p.name for p in path.iterdir())
        ['model', 'planted.safetensors', 'task.json', 'train.jsonl', 'val.jsonl']
    """
    p = PlantedParams(k=k, **params)
    out = Path(out_dir) if out_dir is not None else CACHE / task_name(k, p.modules)
    if not force and _cached(out, p):
        return out
    meta = _describe(p, _generate(out, p))
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 8, 32], help="planted ranks")
    parser.add_argument("--smoke", action="store_true", help=f"tiny tasks {SMOKE}, -smoke dirs")
    parser.add_argument("--out-root", type=Path, default=CACHE, help="parent folder of tasks")
    parser.add_argument("--force", action="store_true", help="regenerate even when cached")
    parser.add_argument(
        "--modules", default="", help=PlantedParams.__dataclass_fields__["modules"].metadata["help"]
    )
    args = parser.parse_args(argv)
    for k in args.k:
        start = time.perf_counter()
        name = task_name(k, args.modules) + ("-smoke" if args.smoke else "")
        extra = (SMOKE if args.smoke else {}) | ({"modules": args.modules} if args.modules else {})
        out = make_task(k, args.out_root / name, force=args.force, **extra)
        meta = json.loads((out / "task.json").read_text())
        loss = meta["losses"]
        print(
            f"{name}: hidden {meta['model']['hidden']}, base {loss['base_val']:.3f} -> "
            f"teacher {loss['teacher_val']:.3f} nats/token on val, "
            f"{time.perf_counter() - start:.1f} s -> {out}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
