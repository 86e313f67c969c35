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

``bench/planted2.py`` (a second family) reuses the helpers below: where the two differ only
by a constant, the constant is a parameter here.

Usage::

    python -m bench.planted --k 2 8 32          # full tasks (a few seconds to a minute each)
    python -m bench.planted --k 2 --smoke       # tiny task, for tests
    python -m bench.planted --k 8 --modules q_proj+v_proj   # planted-k8-q_proj-v_proj
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rankwise.testing import CHARS, make_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parent

__all__ = [
    "PlantedParams",
    "task_name",
    "make_task",
    "build_base",
    "plant",
    "sample",
    "mean_nll",
    "main",
    # shared with bench/planted2.py
    "opt",
    "module_types",
    "check_fields",
    "add_bias_channel",
    "directions",
    "with_update",
    "val_losses",
    "decode",
    "check_round_trip",
    "is_cached",
    "one_thread",
    "write_files",
    "data_meta",
    "cli",
]

CACHE = ROOT / ".cache"
TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
WRITERS = ("o_proj", "down_proj")  # modules that write the residual stream (bias channel)
FIRST_CHAR, END_CHAR = 4, 4 + len(CHARS)  # character ids are 4..99; the rest is masked
EOS = 3
GEN_BATCH = 256  # sequences per sampling forward pass; fixed, since it can change float bits
VERSION = 2  # bump when the generator changes, so cached tasks are rebuilt
BIAS_READ = -30.0  # LM-head weight of non-character ids on the bias channel (logit ≈ -30·h₀)
SMOKE = {"n_train": 48, "n_val": 16, "seq_chars": 31}


def opt(default, help: str):
    """A dataclass field with its ``--help`` text."""
    return field(default=default, metadata={"help": help})


def module_types(modules: str, known: tuple[str, ...]) -> tuple[str, ...]:
    """The types in ``modules`` (joined by '+'), or all of ``known`` when it is ''."""
    return tuple(m for m in modules.split("+") if m) if modules else known


def check_fields(p, known: tuple[str, ...]) -> None:
    """The checks both families' parameters share: k, the sizes, and ``modules``."""
    if p.k < 1:
        raise ValueError(f"--k: the planted rank must be >= 1, got {p.k}")
    for name in ("layers", "seq_chars", "n_train", "n_val"):
        if getattr(p, name) < (2 if name == "seq_chars" else 1):
            raise ValueError(f"--{name.replace('_', '-')}: too small ({getattr(p, name)})")
    types = module_types(p.modules, known)
    if not types or any(m not in known for m in types):
        raise ValueError(f"--modules: expected types among {'+'.join(known)}, got {p.modules!r}")


@dataclass(frozen=True)
class PlantedParams:
    """Everything that determines a planted-rank task; 0 means 'choose from k'."""

    k: int = opt(4, "Rank of the planted update (the answer a rank search should find).")
    hidden: int = opt(0, "Hidden size; 0 = 64 if 4k <= 64 else 128, so ranks up to 4k exist.")
    layers: int = opt(2, "Transformer layers of the tiny Llama.")
    seq_chars: int = opt(127, "Characters per record; train with seq_len = seq_chars + 1.")
    n_train: int = opt(2048, "Training records.")
    n_val: int = opt(256, "Validation records.")
    base_seed: int = opt(0, "Seed of the base model's random initialisation.")
    plant_seed: int = opt(1, "Seed of the planted directions U, V.")
    data_seed: int = opt(2, "Seed of sampling (train uses it, val uses it + 1).")
    embed_scale: float = opt(10.0, "Factor on the embeddings (FIELD.md: makes outputs peaked).")
    head_scale: float = opt(10.0, "Factor on the LM head.")
    gain: float = opt(0.0, "ΔW = gain·‖W‖_F/√k·U·Vᵀ; 0 = 512/hidden (8 at 64, 4 at 128).")
    temperature: float = opt(1.0, "Sampling temperature of the teacher.")
    version: int = opt(VERSION, "Generator version (part of the cache key).")
    modules: str = opt(
        "",
        "Module types that get the update, joined by '+' (e.g. q_proj+v_proj); '' = every "
        "type in TARGETS. The others stay as in the base: a task whose needs differ by type.",
    )

    def __post_init__(self):
        check_fields(self, TARGETS)
        hidden = self.hidden or (64 if 4 * self.k <= 64 else 128)
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "gain", self.gain or 512.0 / hidden)
        if hidden % 4 or self.k > hidden:
            raise ValueError(f"--hidden {hidden}: must be a multiple of 4 and >= k ({self.k})")
        if self.temperature <= 0:
            raise ValueError(f"--temperature: must be > 0, got {self.temperature}")

    def planted_types(self) -> tuple[str, ...]:
        return module_types(self.modules, TARGETS)

    def key(self) -> dict:
        """The cache key: every field, ``modules`` only when set (older tasks stay valid)."""
        d = dataclasses.asdict(self)
        if not self.modules:
            del d["modules"]
        return d


def build_base(p: PlantedParams):
    """The tiny Llama with scaled embeddings/head and a constant bias channel (dimension 0)."""
    model = tiny_model("llama", seed=p.base_seed, hidden=p.hidden, layers=p.layers)
    return add_bias_channel(model, p, head_scale=p.head_scale)


@torch.no_grad()
def add_bias_channel(model, p, head_scale: float):
    """``model`` with embeddings × ``p.embed_scale``, LM head × ``head_scale`` and the bias
    channel: residual dimension 0 held at 1, read by the non-character ids (weight BIAS_READ)
    and by EOS (weight from :func:`_eos_read`). ``p``: either family's parameters."""
    other = torch.ones(model.config.vocab_size, dtype=torch.bool)
    other[FIRST_CHAR:END_CHAR] = False
    model.model.embed_tokens.weight.mul_(p.embed_scale)
    model.model.embed_tokens.weight[:, 0] = 1.0
    head = model.lm_head.weight
    head.mul_(head_scale)
    head[:, 0] = 0.0  # characters do not read the bias channel ...
    head[other] = 0.0
    head[other, 0] = BIAS_READ  # ... the other ids read it and lose
    for layer in model.model.layers:  # nothing writes to the bias channel
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            proj.weight[0] = 0.0
            if proj.bias is not None:
                proj.bias[0] = 0.0
    head[EOS, 0] = _eos_read(model.eval(), p)
    return model


@torch.no_grad()
def _eos_read(model, p) -> float:
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
    dirs = directions(base, p.planted_types(), p.k, p.plant_seed)
    factors = {name: (u, v, p.gain * norm / math.sqrt(p.k)) for name, (u, v, norm) in dirs.items()}
    return with_update(base, factors), factors


@torch.no_grad()
def directions(model, types: tuple[str, ...], k: int, seed: int) -> dict:
    """Random directions {module: (U, V, ‖W‖_F)} for the modules of ``types``, in module
    order; U, V have ``k`` orthonormal columns, and U none on the bias channel."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in types:
            continue
        out_dim, in_dim = module.weight.shape
        u = torch.randn(out_dim, k, generator=gen)
        if kind in WRITERS:
            u[0] = 0.0  # keep the bias channel constant in the teacher too
        u = torch.linalg.qr(u).Q
        v = torch.linalg.qr(torch.randn(in_dim, k, generator=gen)).Q
        out[name] = (u, v, module.weight.norm().item())
    return out


@torch.no_grad()
def with_update(base, factors: dict):
    """A copy of ``base`` with W += (U·s)·Vᵀ per {module: (U, V, s)}; s is a scale or the
    singular values, a vector of k."""
    teacher = copy.deepcopy(base)
    modules = dict(teacher.named_modules())
    for name, (u, v, s) in factors.items():
        modules[name].weight += (u * s) @ v.T
    return teacher.eval()


def _mask(logits: torch.Tensor) -> torch.Tensor:
    """Logits with every non-character id (specials, EOS, 100..127) at -inf."""
    logits = logits.clone()
    logits[..., :FIRST_CHAR] = -math.inf
    logits[..., END_CHAR:] = -math.inf
    return logits


@torch.no_grad()
def sample(teacher, n: int, seq_chars: int, seed: int, temperature: float = 1.0) -> torch.Tensor:
    """``n`` sequences of ``seq_chars`` character ids: a uniform first character, then the
    teacher's next-token distribution (characters only, at ``temperature``)."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(seed)
    chunks = []
    for start in range(0, n, GEN_BATCH):
        ids = torch.randint(FIRST_CHAR, END_CHAR, (min(GEN_BATCH, n - start), 1), generator=gen)
        # The cache goes in positionally: the keyword is past_key_values before
        # transformers 5.x and cache after; DynamicCache fills itself in place.
        cache = DynamicCache()
        logits = teacher(ids, None, None, cache, use_cache=True).logits
        for _ in range(seq_chars - 1):
            probs = (_mask(logits[:, -1].double()) / temperature).softmax(-1)
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


def val_losses(base, teacher, train, val) -> dict:
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


def decode(ids: torch.Tensor) -> list[str]:
    """The records' texts: character ids back to characters."""
    return ["".join(CHARS[i - FIRST_CHAR] for i in row) for row in ids.tolist()]


def check_round_trip(tokenizer, texts: list[str], ids: torch.Tensor) -> None:
    """Every record tokenises back to the ids it was sampled as. Special tokens are left
    out: a trainer adds its own (EOS) around the text."""
    got = tokenizer(texts, add_special_tokens=False).input_ids
    for text, row, back in zip(texts, ids.tolist(), got, strict=True):
        if back != row:
            who = f"{type(tokenizer).__name__}({tokenizer.name_or_path!r})"
            raise AssertionError(f"{who}: round trip failed for {text!r}: {back} != {row}")


def _write_jsonl(path: Path, texts: list[str]) -> str:
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_cached(out: Path, p) -> bool:
    """Whether ``out`` holds a complete task generated from the parameters ``p``."""
    try:
        meta = json.loads((out / "task.json").read_text())
    except (OSError, ValueError):
        return False
    files = ("train.jsonl", "val.jsonl", "model/model.safetensors")
    return meta.get("params") == p.key() and all((out / f).exists() for f in files)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: the same float bits, hence the same samples, on every
    machine with this torch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def write_files(out: Path, base, factors: dict, texts: dict, s_name: str = "scale") -> dict:
    """Write model/ (``base`` and the character tokenizer), planted.safetensors (U, V and
    s per module, s stored as ``<module>.<s_name>``), train.jsonl and val.jsonl; return
    their sha256, as task.json records them."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "task.json").unlink(missing_ok=True)  # written last: marks a complete folder
    base.save_pretrained(out / "model")
    make_tokenizer().save_pretrained(out / "model")
    tensors = {}
    for name, (u, v, s) in factors.items():
        tensors |= {f"{name}.U": u, f"{name}.V": v, f"{name}.{s_name}": torch.as_tensor(s)}
    save_file({k: t.contiguous() for k, t in tensors.items()}, out / "planted.safetensors")
    sha = {f"{s}.jsonl": _write_jsonl(out / f"{s}.jsonl", texts[s]) for s in ("train", "val")}
    sha["model/model.safetensors"] = _sha256(out / "model" / "model.safetensors")
    sha["planted.safetensors"] = _sha256(out / "planted.safetensors")
    return sha


def _generate(out: Path, p: PlantedParams) -> dict:
    """Write model/, planted.safetensors, train.jsonl, val.jsonl; return task.json's body."""
    with one_thread():
        base = build_base(p)
        teacher, factors = plant(base, p)
        train = sample(teacher, p.n_train, p.seq_chars, p.data_seed, p.temperature)
        val = sample(teacher, p.n_val, p.seq_chars, p.data_seed + 1, p.temperature)
        losses = val_losses(base, teacher, train, val)
    tokenizer = make_tokenizer()
    texts = {"train": decode(train), "val": decode(val)}
    for split, ids in (("train", train), ("val", val)):
        check_round_trip(tokenizer, texts[split], ids)
    return {"losses": losses, "sha256": write_files(out, base, factors, texts)}


def data_meta(p, planting: dict, temperature_note: str = "") -> dict:
    """task.json's ``sizes``, ``generation`` and ``usage``, as both families write them;
    ``planting`` (how ΔW was made) goes into ``generation`` after the sampling fields."""
    note = {"temperature_note": temperature_note} if temperature_note else {}
    return {
        "sizes": {"train": p.n_train, "val": p.n_val, "seq_chars": p.seq_chars},
        "generation": {
            "first_token": "uniform over the character ids",
            "allowed_ids": [FIRST_CHAR, END_CHAR - 1],
            "temperature": p.temperature,
        }
        | note
        | {"sampling_batch": GEN_BATCH}
        | planting
        | {
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
    }


def _describe(p: PlantedParams, body: dict) -> dict:
    cfg = {"hidden": p.hidden, "intermediate": 2 * p.hidden, "layers": p.layers}
    meta = {
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
    }
    delta = "W += gain*||W||_F/sqrt(k) * U @ V.T, U and V orthonormal (k columns)"
    return meta | data_meta(p, {"delta": delta}) | body


def task_name(k: int, modules: str = "", family: str = "planted") -> str:
    """``planted-k8``, or ``planted-k8-q_proj-v_proj`` when only some types get the update
    (``family`` replaces ``planted``)."""
    return f"{family}-k{k}" + (f"-{modules.replace('+', '-')}" if modules else "")


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
    if not force and is_cached(out, p):
        return out
    meta = _describe(p, _generate(out, p))
    (out / "task.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def cli(
    argv: list[str] | None,
    doc: str,
    params: type,
    smoke: dict,
    name: Callable[[int, str], str],
    make: Callable[..., Path],
    summary: Callable[[dict], str],
) -> int:
    """A family's command line: ``make`` a task per ``--k`` and print its ``summary``
    (of task.json). ``params`` is the family's parameter class, ``name`` its task_name."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--k", type=int, nargs="+", default=[2, 8, 32], help="planted ranks")
    parser.add_argument("--smoke", action="store_true", help=f"tiny tasks {smoke}, -smoke dirs")
    parser.add_argument("--out-root", type=Path, default=CACHE, help="parent folder of tasks")
    parser.add_argument("--force", action="store_true", help="regenerate even when cached")
    modules_help = params.__dataclass_fields__["modules"].metadata["help"]
    parser.add_argument("--modules", default="", help=modules_help)
    args = parser.parse_args(argv)
    for k in args.k:
        start = time.perf_counter()
        folder = name(k, args.modules) + ("-smoke" if args.smoke else "")
        extra = (smoke if args.smoke else {}) | ({"modules": args.modules} if args.modules else {})
        out = make(k, args.out_root / folder, force=args.force, **extra)
        meta = json.loads((out / "task.json").read_text())
        print(f"{folder}: {summary(meta)}, {time.perf_counter() - start:.1f} s -> {out}")
    return 0


def _summary(meta: dict) -> str:
    loss = meta["losses"]
    return (
        f"hidden {meta['model']['hidden']}, base {loss['base_val']:.3f} -> "
        f"teacher {loss['teacher_val']:.3f} nats/token on val"
    )


def main(argv: list[str] | None = None) -> int:
    return cli(argv, __doc__, PlantedParams, SMOKE, task_name, make_task, _summary)


if __name__ == "__main__":
    raise SystemExit(main())
