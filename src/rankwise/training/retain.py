"""What a rank costs the base model: the retain set, and each trial's forgetting on it.

A higher rank learns more of the new data and also changes more of what the base model
knew ("LoRA Learns Less and Forgets Less", Biderman et al., 2024). rankwise measures that
cost per trial, beside the gain, on a *retain set*: general text no trial trains on.

The retain set (:func:`prepare_retain`):

- by default, :data:`RETAIN_SEQUENCES` sequences of :data:`RETAIN_LENGTH` tokens sampled
  from the base model itself before the first trial: each starts at the BOS token and is
  drawn at temperature 1 (no top-k, no top-p) with a generator seeded by ``--seed``. It is
  text the base model finds typical, so nothing needs downloading;
- ``--retain FILE``: the user's own general text, in any format ``--train`` reads (the
  loss tokens of its first records in a seeded order, packed into the same number of
  blocks of the same length);
- ``--no-retain``: none. A classifier (``--task seq-cls``) has no next-token distribution,
  so it has no retain set.

The base model's side is computed once and cached with the tokens in
``DIR/data/retain.safetensors``: its loss per retain token and, at every position, its
:data:`TOP_K` most likely next tokens with their log-probabilities (2 MB, where the whole
distribution would be 100 MB for a 49k vocabulary). The sha256 of the tokens is part of the
run's identity.

A trial's forgetting (:func:`measure_adapter`), at its best checkpoint (the adapter folder
it saved), under the trial's precision:

- ``forgetting``: the retain loss of the adapted model minus the base model's (nats per
  token). On sampled text this is also a one-sample estimate of KL(base || adapted): each
  token was drawn from the base's distribution, so E[log p(x) - log q(x)] = KL(p || q);
- ``forgetting_kl``: the mean KL(base || adapted) over the retain positions, from the
  distributions themselves: the base's :data:`TOP_K` tokens, and one bin for the rest of its
  mass. Merging tokens into one bin can only lower a KL (the data-processing inequality), so
  this is a lower bound of the full KL, and without the sampling noise of the first.

Cost (bench/RESULTS.md, "Forgetting"): one forward pass over 16 x 64 tokens per trial (two
batches of 8), and the sampling once per run. On SmolLM2 on a CPU that keeps the retain
evaluation under 10% of a search's wall time; calibration trials are not measured.

Example (a fresh LoRA adapter, B = 0, changes nothing, so it forgets nothing; the tiny
vocabulary, 128 tokens, is all inside the top K):
    >>> from rankwise.testing import make_tokenizer, tiny_model
    >>> model, tok = tiny_model(), make_tokenizer()
    >>> retain = self_sampled(model, tok, "cpu", seed=0, sequences=4, length=12)
    >>> tuple(retain.ids.shape), retain.base_loss > 0, tuple(retain.top_ids.shape)
    ((4, 12), True, (4, 11, 128))
    >>> from peft import LoraConfig, get_peft_model
    >>> peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    >>> forgetting(peft_model, retain, "cpu")
    {'forgetting': 0.0, 'forgetting_kl': 0.0}
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from rankwise.errors import ConfigError
from rankwise.records import SKIPPED, TrialKind, TrialResult, TrialSpec
from rankwise.training.evaluate import _autocast

__all__ = [
    "RETAIN_SEQUENCES",
    "RETAIN_LENGTH",
    "TOP_K",
    "SELF_SAMPLED",
    "RetainSet",
    "Forgetting",
    "check_retain_options",
    "read_retain_records",
    "prepare_retain",
    "self_sampled",
    "from_records",
    "forgetting",
    "measure_adapter",
]

# 16 x 64 tokens: two forward batches of 8 per trial. On SmolLM2 on a CPU that is ~2 s of a
# ~60 s demo trial, and sampling them once ~15 s of a search (bench/RESULTS.md, "Forgetting").
RETAIN_SEQUENCES = 16
RETAIN_LENGTH = 64
# Base next-token log-probs kept per position: on SmolLM2's own samples the top 256 of 49,152
# tokens hold ~90% of the mass; the rest is one bin of the KL.
TOP_K = 256
BATCH = 8  # sequences per forward pass
SELF_SAMPLED = "self-sampled"
IGNORE = -100
# Kinds whose forgetting is measured: everything that delivers or compares an adapter.
MEASURED = frozenset(TrialKind) - {TrialKind.BASE, TrialKind.CALIBRATION}
# Kinds --max-forgetting can exclude: the points of a rank curve (a stage's variants are
# judged against the chosen rank, which already passed).
BUDGETED = frozenset({TrialKind.MAIN, TrialKind.NESTED, TrialKind.TARGETS})


@dataclass
class RetainSet:
    """The retain blocks and the base model's figures on them."""

    ids: torch.Tensor  # [N, L] token ids
    labels: torch.Tensor  # [N, L]: -100 where no loss (a prompt, padding)
    source: str  # SELF_SAMPLED or the file
    base_loss: float = math.nan  # the base model's mean loss per retain token
    top_ids: torch.Tensor | None = None  # [N, L-1, K] the base's most likely next tokens
    top_logp: torch.Tensor | None = None  # [N, L-1, K] their log-probabilities
    seconds: float = 0.0  # to build it (sampling, reading, the base's pass)
    extra: dict = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        """Of the token ids and loss masks: the retain set's part of the run's identity."""
        h = hashlib.sha256()
        for t in (self.ids, self.labels):
            h.update(f"{tuple(t.shape)}".encode())
            h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        return h.hexdigest()

    @property
    def tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())

    def info(self) -> dict:
        """What the run records of it (store meta ``retain``, shown by ``show``)."""
        return {
            "source": self.source,
            "sequences": int(self.ids.shape[0]),
            "length": int(self.ids.shape[1]),
            "tokens": self.tokens,
            "sha256": self.sha256,
            "base_loss": self.base_loss,
            "top_k": int(self.top_ids.shape[-1]) if self.top_ids is not None else None,
            "top_k_mass": self.extra.get("top_k_mass"),
            "seconds": round(self.seconds, 2),
        }

    def save(self, path: Path, key: str) -> Path:
        """Cache it (atomically) for every trial and for resume."""
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tensors = {"ids": self.ids, "labels": self.labels,
                   "top_ids": self.top_ids, "top_logp": self.top_logp}  # fmt: skip
        meta = {"key": key, "info": json.dumps(self.info()), "extra": json.dumps(self.extra)}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path, key: str) -> RetainSet | None:
        """The cached set, if it was built for ``key`` (else None: build it again)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not path.is_file():
            return None
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        t, info = load_file(str(path)), json.loads(meta["info"])
        return cls(t["ids"], t["labels"], info["source"], info["base_loss"], t["top_ids"],
                   t["top_logp"], info["seconds"], json.loads(meta.get("extra") or "{}"))  # fmt: skip


# -- which retain set -----------------------------------------------------------------------
def retain_source(opts) -> str | None:
    """SELF_SAMPLED, the ``--retain`` file, or None (``--no-retain``, or a classifier)."""
    value = opts.data.retain
    if value is False:
        return None
    if opts.model.task == "seq-cls":
        return None if value is None else value  # check_retain_options refuses a file
    return SELF_SAMPLED if value is None else str(value)


def check_retain_options(opts) -> None:
    """Combinations refused before anything is loaded (one line naming the flag)."""
    if opts.model.task == "seq-cls" and isinstance(opts.data.retain, str):
        raise ConfigError(
            "--retain: needs --task causal-lm (a classifier has no next-token distribution "
            "to measure forgetting on)"
        )
    if opts.search.max_forgetting is not None and retain_source(opts) is None:
        why = "--no-retain turned it off" if opts.data.retain is False else "--task seq-cls"
        raise ConfigError(f"--max-forgetting: needs a retain set ({why})")


def read_retain_records(opts) -> tuple[str, list] | None:
    """The ``--retain`` file's records, read (and checked) before the model is loaded, so an
    empty or unreadable file is refused at once; None for a sampled retain set or none."""
    source = retain_source(opts)
    if source in (None, SELF_SAMPLED):
        return None
    from rankwise.io.formats import RecordChecker
    from rankwise.io.readers import load_records

    cfg = replace(opts.data, format="auto")  # its own format, with the --train field names
    records = load_records(source, cfg, "--retain")
    check = RecordChecker(cfg, f"--retain: {source}")
    for i, record in enumerate(records, 1):
        check(record, f"record {i}")
    return check.format, records


def prepare_retain(opts, model, tokenizer, device: str, autocast: str | None, cache: Path,
                   records: list | None = None) -> tuple[RetainSet | None, str]:  # fmt: skip
    """The run's retain set and its cache key: the cached one when it was built the same
    way, else sampled (or read from ``records``) and measured on the base model now.
    Nothing is written here; :meth:`RetainSet.save` caches it once the run is set up."""
    source = retain_source(opts)
    if source is None:
        return None, ""
    key = _cache_key(opts, source, tokenizer, device, autocast)
    cached = RetainSet.load(cache, key)
    if cached is not None:
        return cached, key
    seed = opts.train.seed
    if source == SELF_SAMPLED:
        return self_sampled(model, tokenizer, device, seed, autocast=autocast), key
    fmt, rows = records or read_retain_records(opts)
    cfg = replace(opts.data, format=fmt)
    return from_records(rows, fmt, cfg, tokenizer, model, device, seed, autocast, source), key


def _cache_key(opts, source: str, tokenizer, device: str, autocast: str | None) -> str:
    """Everything the cached tokens and base figures depend on."""
    parts = {
        "model": [opts.model.model, opts.model.dtype, opts.model.quantize],
        "tokenizer": [type(tokenizer).__name__, len(tokenizer)],
        "source": source,
        "seed": opts.train.seed,
        "shape": [RETAIN_SEQUENCES, RETAIN_LENGTH, TOP_K],
        "precision": [device, autocast],
    }
    p = Path(source).expanduser()
    if source != SELF_SAMPLED and p.is_file():
        st = p.stat()
        parts["file"] = [str(p.resolve()), st.st_size, st.st_mtime_ns]
        fields = ("text_field", "prompt_field", "completion_field", "messages_field",
                  "conversations_field")  # fmt: skip
        parts["fields"] = [getattr(opts.data, f) for f in fields]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


# -- building it ----------------------------------------------------------------------------
@contextmanager
def _evaluating(model) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients; the caller's mode afterwards."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def self_sampled(model, tokenizer, device: str, seed: int = 0,
                 sequences: int = RETAIN_SEQUENCES, length: int = RETAIN_LENGTH,
                 autocast: str | None = None) -> RetainSet:  # fmt: skip
    """``sequences`` x ``length`` tokens the base model samples from BOS at temperature 1,
    with the base's figures on them."""
    t0 = time.perf_counter()
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    gen = torch.Generator().manual_seed(seed)
    ids = torch.full((sequences, 1), int(start), dtype=torch.long)
    with _evaluating(model):
        past, step = None, ids
        for _ in range(length - 1):
            out = model(input_ids=step.to(device), past_key_values=past, use_cache=True)
            past = out.past_key_values
            probs = torch.softmax(out.logits[:, -1].float().cpu(), dim=-1)
            step = torch.multinomial(probs, 1, generator=gen)
            ids = torch.cat([ids, step], dim=1)
    retain = RetainSet(ids, ids.clone(), SELF_SAMPLED)
    _measure_base(model, retain, device, autocast)
    retain.seconds = time.perf_counter() - t0
    return retain


def from_records(records: list, fmt: str, cfg, tokenizer, model, device: str, seed: int = 0,
                 autocast: str | None = None, source: str = "") -> RetainSet:  # fmt: skip
    """The loss tokens of ``records`` (a seeded order, rendered as ``--train`` renders them)
    packed into at most :data:`RETAIN_SEQUENCES` blocks of :data:`RETAIN_LENGTH` tokens."""
    from rankwise.io.formats import render_batch

    t0 = time.perf_counter()
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    need, ids, labels = RETAIN_SEQUENCES * RETAIN_LENGTH, [], []
    for start in range(0, len(order), 64):
        chunk = [records[i] for i in order[start : start + 64]]
        for x, y in render_batch(chunk, fmt, tokenizer, cfg):
            ids += x
            labels += y
        if len(ids) >= need:
            break
    if not any(y != IGNORE for y in labels[1:need]):
        raise ConfigError(f"--retain: {source}: no tokens to measure after rendering")
    n = min(RETAIN_SEQUENCES, -(-len(ids) // RETAIN_LENGTH))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    block_ids = torch.full((n * RETAIN_LENGTH,), pad, dtype=torch.long)
    block_labels = torch.full((n * RETAIN_LENGTH,), IGNORE, dtype=torch.long)
    used = min(len(ids), n * RETAIN_LENGTH)
    block_ids[:used] = torch.tensor(ids[:used])
    block_labels[:used] = torch.tensor(labels[:used])
    retain = RetainSet(block_ids.view(n, -1), block_labels.view(n, -1), source)
    _measure_base(model, retain, device, autocast)
    retain.seconds = time.perf_counter() - t0
    return retain


# -- measuring ------------------------------------------------------------------------------
def _batches(model, retain: RetainSet, device: str, autocast: str | None):
    """(slice, next-token log-probs [B, L-1, V] in fp32, targets [B, L-1]) per batch."""
    for start in range(0, retain.ids.shape[0], BATCH):
        rows = slice(start, start + BATCH)
        x = retain.ids[rows].to(device)
        with _autocast(device, autocast):
            logits = model(input_ids=x).logits[:, :-1]
        yield rows, torch.log_softmax(logits.float(), dim=-1), retain.labels[rows, 1:].to(device)


def _token_nll(logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the loss tokens."""
    mask = target != IGNORE
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * mask).sum()


def _measure_base(model, retain: RetainSet, device: str, autocast: str | None) -> None:
    """The base model's loss per retain token and its top-K next tokens at each position."""
    k = min(TOP_K, model.config.vocab_size)
    total, tops, mass = 0.0, [], []
    with _evaluating(model):
        for _, logp, target in _batches(model, retain, device, autocast):
            total += float(_token_nll(logp, target))
            top = logp.topk(k, dim=-1)
            tops.append((top.indices.to(torch.int32).cpu(), top.values.cpu()))
            mass.append(top.values.exp().sum(-1)[target != IGNORE].cpu())
    retain.base_loss = total / max(retain.tokens, 1)
    retain.top_ids = torch.cat([t[0] for t in tops])
    retain.top_logp = torch.cat([t[1] for t in tops])
    retain.extra["top_k_mass"] = round(float(torch.cat(mass).mean()), 4)


def _binned_kl(logq: torch.Tensor, top_ids: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position over the base's top-K tokens plus one bin for the rest."""
    logq_k = logq.gather(-1, top_ids.long())
    p_k = top_logp.exp()
    inside = (p_k * (top_logp - logq_k)).sum(-1)
    rest_p = (1 - p_k.sum(-1)).clamp(min=0.0)
    rest_q = (1 - logq_k.exp().sum(-1)).clamp(min=1e-12)
    outside = torch.where(rest_p > 0, rest_p * (rest_p.clamp(min=1e-12).log() - rest_q.log()), 0.0)
    return inside + outside


def forgetting(model, retain: RetainSet, device: str, autocast: str | None = None) -> dict:
    """``{"forgetting": retain-loss increase over the base, "forgetting_kl": mean KL(base ||
    model)}`` of ``model`` (the base with an adapter on) in nats per retain token."""
    total, kl = 0.0, 0.0
    with _evaluating(model):
        for rows, logq, target in _batches(model, retain, device, autocast):
            total += float(_token_nll(logq, target))
            top_ids, top_logp = retain.top_ids[rows].to(device), retain.top_logp[rows].to(device)
            per_position = _binned_kl(logq, top_ids, top_logp)
            kl += float((per_position * (target != IGNORE)).sum())
    n = max(retain.tokens, 1)
    return {"forgetting": total / n - retain.base_loss, "forgetting_kl": kl / n}


def _saved_spec(spec: TrialSpec, folder: Path) -> TrialSpec:
    """``spec`` at the rank and alpha the saved adapter has (a nested run's truncation)."""
    saved = json.loads((folder / "adapter_config.json").read_text())
    r, alpha = int(saved["r"]), float(saved["lora_alpha"])
    return spec.replace(rank=r, lora=spec.lora.replace(r=r, lora_alpha=alpha))


def measure_adapter(ctx, spec: TrialSpec, folder: Path, retain: RetainSet) -> dict:
    """:func:`forgetting` of the adapter saved in ``folder`` (a trial's best checkpoint),
    attached to the loaded base as the trial attached it (the same init, so PiSSA's
    residual base weights are the trial's) and taken off again."""
    from rankwise.training.adapter import _warm_start, attached

    spec = _saved_spec(spec, folder)
    with torch.random.fork_rng(devices=[]), attached(ctx.model, spec) as peft_model:
        _warm_start(peft_model, str(folder))
        return forgetting(peft_model, retain, ctx.device, spec.train.autocast)


@dataclass
class Forgetting:
    """The search's side: each finished trial measured at its best checkpoint, and
    ``--max-forgetting`` applied (a rank that drifts more is recorded as skipped)."""

    retain: RetainSet
    ctx: object  # rankwise.training.adapter.TrialContext
    run_dir: object  # rankwise.storage.rundir.RunDir: where each trial's adapter is
    max_forgetting: float | None = None

    def __call__(self, result: TrialResult, spec: TrialSpec) -> TrialResult:
        folder = Path(self.run_dir.trial_adapter(result.key))
        if not result.ok or result.kind not in MEASURED or not folder.is_dir():
            return result
        t0 = time.perf_counter()
        try:
            measured = measure_adapter(self.ctx, spec, folder, self.retain)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # the trial itself stands
            note = f"forgetting not measured: {type(exc).__name__}: {exc}"
            return result.replace(extra={**result.extra, "forgetting_error": note})
        result = result.replace(**measured, retain_seconds=time.perf_counter() - t0)
        return self.budget(result)

    def budget(self, result: TrialResult) -> TrialResult:
        """``result`` recorded as skipped when it forgets more than ``--max-forgetting``."""
        limit, f = self.max_forgetting, result.forgetting
        if limit is None or f is None or result.kind not in BUDGETED or f <= limit:
            return result
        why = f"retain-loss increase {f:.4f} nats > --max-forgetting {limit:g}"
        return result.replace(status=SKIPPED, reason=why)
