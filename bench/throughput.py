"""Trial throughput and overhead: a rankwise trial against a plain transformers.Trainer run.

Both arms do the same work on the same preloaded model and token blocks: attach a fresh PEFT
LoRA adapter (same config, same init seed), train ``--steps`` AdamW steps (same lr, linear
warm-up/decay, gradient clipping 1.0, no weight decay) on micro-batches of ``--batch``
blocks of ``--seq-len`` tokens in the same order, evaluate once on the same validation
blocks with the same function, and remove the adapter (``unload()``).

- **A, rankwise**: ``rankwise.training.trial.run_trial(spec, TrialContext(...))`` with
  ``eval_every`` past the last step, so its only evaluation is the final one.
- **B, baseline**: ``peft.get_peft_model`` + ``transformers.Trainer`` (``optim
  adamw_torch``, no logging, saving, or evaluation strategy; a sequential sampler over the
  blocks rankwise would draw), then ``rankwise.training.evaluate.evaluate``.

The arms alternate in pairs ordered AB, BA, AB, BA (``--pairs``) after one unmeasured
warm-up of each, so a steady drift in the machine's load hits both arms equally (plain
AB, AB, AB favoured B while the load fell). Reported per arm: tokens/s end to end (training
tokens ÷ the whole trial, evaluation included in both) and in the training span (steps 2..N,
steady state); the ratio rankwise ÷ baseline is the median over pairs. Overhead: time from
the trial's start to its first optimizer step, and from the end of its last step to the
return (minus the final evaluation), as a share of the trial's wall time. Timestamps come
from a forward pre-hook on the base model (start of the first step), the progress callback
(rankwise) or ``TrainerCallback.on_step_end`` (baseline), and a timer around
``rankwise.training.evaluate.evaluate``.

Precision (``--precisions``), each arm's setting said in the table:

- ``default``: each side's default. rankwise ``--dtype auto`` (bf16 autocast of the
  forward/backward where the CPU or GPU has bf16, fp32 weights and optimizer state); Trainer's
  ``TrainingArguments`` default (``bf16=False``: fp32 throughout).
- ``fp32``: both fp32 throughout (rankwise ``--dtype float32``).
- ``bf16``: both under bf16 autocast with fp32 weights (Trainer ``bf16=True``, which on a
  CPU is accelerate's autocast).

Usage::

    .venv/bin/python -m bench.throughput                 # SmolLM2-135M, then the tiny Llama
    .venv/bin/python -m bench.throughput --smoke         # tiny model, seconds
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import rankwise.training.evaluate as eval_mod
from rankwise.config import DataConfig, ModelConfig
from rankwise.io.data import prepare_data
from rankwise.records import TrialSpec
from rankwise.training.adapter import TrialContext, lora_config
from rankwise.training.evaluate import _Batches
from rankwise.training.trial import run_trial

ROOT = Path(__file__).resolve().parent
OUT = ROOT / ".cache" / "runs" / "throughput"
TARGETS = ["q_proj", "v_proj"]  # PEFT's default for Llama-family models
PRECISIONS = ("default", "fp32", "bf16")
WORDS = "the of a to in rank adapter loss model token value layer step data search".split()


class _EvalTimer:
    """Wraps ``rankwise.training.evaluate.evaluate`` (which run_trial looks up at call time) to record
    the start and end of every evaluation."""

    def __init__(self):
        self.inner = eval_mod.evaluate
        self.spans: list[tuple[float, float]] = []

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return self.inner(*args, **kwargs)
        finally:
            self.spans.append((t0, time.perf_counter()))


def load(model: str, args, work: Path, device: str = "cpu"):
    """(model, tokenizer, token data) for ``smollm2`` (or another ``--model``) or the
    in-process ``tiny`` Llama, on ``device``."""
    from rankwise.io.models import load_model
    from rankwise.testing import make_tokenizer, tiny_model

    if model == "tiny":
        net, tok = tiny_model("llama").requires_grad_(False).to(device), make_tokenizer()
        rng = random.Random(0)
        lines = (" ".join(rng.choice(WORDS) for _ in range(20)) for _ in range(400))
        (work / "tiny.txt").write_text("\n".join(lines))
        train = str(work / "tiny.txt")
    else:
        net, tok, _ = load_model(ModelConfig(model=model, device=device))
        train = "stdlib-docstrings"
    cfg = DataConfig(train=train, seq_len=args.seq_len, max_examples=2000)
    return net, tok, prepare_data(cfg, tok, work / model, seed=0)


def rankwise_autocast(precision: str, n_params: int, device: str = "cpu") -> str | None:
    """What rankwise's trial runs under: ``--dtype auto`` picks bf16 autocast where the
    hardware has it (rankwise.io.models.pick_autocast); ``fp32`` is ``--dtype float32``."""
    from rankwise.io.models import pick_autocast

    if precision == "fp32":
        return None
    if precision == "bf16":
        return "bfloat16"
    return pick_autocast("auto", device, n_params)


def make_spec(args, steps: int, autocast: str | None = None) -> TrialSpec:
    lora = {"r": args.rank, "lora_alpha": 16.0, "target_modules": TARGETS, "lora_dropout": 0.0}
    train = {
        "max_steps": steps,
        "batch_size": args.batch,
        "grad_accum": 1,
        "lr": args.lr,
        "warmup_steps": args.warmup,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "eval_every": steps + 1,  # only the final evaluation (always done at the last step)
        "eval_batches": args.eval_batches,
        "seed": 0,
        "autocast": autocast,
    }
    return TrialSpec("bench", args.rank, 0, lora, train, {}, "", adapter_dir=None)


def _forward_stamps(model) -> tuple[list[float], object]:
    """Times at which the base model's forward starts (the first is the first step's start)."""
    stamps: list[float] = []
    handle = model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    return stamps, handle


def run_rankwise(ctx: TrialContext, spec: TrialSpec) -> dict:
    timer = _EvalTimer()
    steps: list[float] = []
    eval_mod.evaluate = timer
    forwards, hook = _forward_stamps(ctx.model)
    try:
        t0 = time.perf_counter()
        result = run_trial(spec, ctx, progress=lambda s, n, loss: steps.append(time.perf_counter()))
        t1 = time.perf_counter()
    finally:
        eval_mod.evaluate = timer.inner
        hook.remove()
    assert result.ok, result.reason
    eval_start, eval_end = timer.spans[-1]
    return _figures(
        t0,
        t1,
        first_begin=forwards[0],
        first_end=steps[0],  # the callback fires right after the optimizer step
        last_end=eval_start,  # the final evaluation starts right after the last step
        eval_seconds=eval_end - eval_start,
        tokens=result.train_tokens,
        n=result.steps,
        loss=sum(v for _, v in result.train_curve) / len(result.train_curve),
        val=result.best_val_loss,
    ) | {"record_setup_seconds": result.setup_seconds, "record_wall": result.wall_seconds}


def run_baseline(ctx: TrialContext, spec: TrialSpec, work: Path, bf16: bool = False) -> dict:
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    tc = spec.train
    batches = _Batches(ctx.data.train_ids.shape[0], tc.batch_size, tc.seed)
    order = torch.cat([batches.next() for _ in range(tc.max_steps)])  # rankwise's draws
    data = [{"input_ids": ctx.data.train_ids[i], "labels": ctx.data.train_labels[i]} for i in order]
    stamps: dict[str, list[float]] = {"end": []}

    class Stamps(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps["end"].append(time.perf_counter())

    class InOrder(Trainer):  # the blocks in rankwise's order, not reshuffled
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    forwards, hook = _forward_stamps(ctx.model)
    t0 = time.perf_counter()
    torch.manual_seed(tc.seed)
    peft_model = get_peft_model(ctx.model, lora_config(spec))
    targs = TrainingArguments(
        output_dir=str(work / "trainer"),
        per_device_train_batch_size=tc.batch_size,
        max_steps=tc.max_steps,
        learning_rate=tc.lr,
        warmup_steps=tc.warmup_steps,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=str(ctx.device) == "cpu",
        bf16=bf16,
        dataloader_pin_memory=False,
        seed=spec.seed,
    )
    trainer = InOrder(model=peft_model, args=targs, train_dataset=data, callbacks=[Stamps()])
    out = trainer.train()
    e0 = time.perf_counter()
    val = eval_mod.validation_loss(peft_model, ctx, spec)
    e1 = time.perf_counter()
    peft_model.unload()
    del trainer
    t1 = time.perf_counter()
    hook.remove()
    return _figures(
        t0,
        t1,
        first_begin=forwards[0],
        first_end=stamps["end"][0],
        last_end=stamps["end"][-1],
        eval_seconds=e1 - e0,
        tokens=tc.max_steps * tc.batch_size * ctx.data.train_ids.shape[1],
        n=len(stamps["end"]),
        loss=out.training_loss,
        val=val,
    ) | {"tail_before_eval": e0 - stamps["end"][-1]}


def _figures(t0, t1, first_begin, first_end, last_end, eval_seconds, tokens, n, loss, val):
    wall = t1 - t0
    setup = first_begin - t0
    teardown = t1 - last_end - eval_seconds
    return {
        "wall": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "tok_s_train_span": tokens * (n - 1) / n / (last_end - first_end),
        "setup": setup,
        "teardown": teardown,
        "eval": eval_seconds,
        "overhead_share": (setup + teardown) / wall,
        "mean_train_loss": loss,
        "val_loss": val,
    }


def bench_model(
    model: str, args, work: Path, precision: str = "default", loaded=None, device: str = "cpu"
) -> dict:
    net, tok, data = loaded or load(model, args, work, device)
    ctx = TrialContext(net, tok, device, data)
    from rankwise.io.models import param_count

    autocast = rankwise_autocast(precision, param_count(net), device)
    bf16 = precision == "bf16"
    # The baseline is evaluated as it trained: under autocast when Trainer used bf16.
    spec_a = make_spec(args, args.steps, autocast)
    spec_b = make_spec(args, args.steps, "bfloat16" if bf16 else None)
    run_rankwise(ctx, make_spec(args, 2, autocast))  # warm-up, unmeasured
    run_baseline(ctx, make_spec(args, 2, spec_b.train.autocast), work, bf16)
    pairs = []
    for i in range(args.pairs):  # A B, B A, A B, ...: a linear drift in load cancels out
        if i % 2 == 0:
            a, b = run_rankwise(ctx, spec_a), run_baseline(ctx, spec_b, work, bf16)
        else:
            b, a = run_baseline(ctx, spec_b, work, bf16), run_rankwise(ctx, spec_a)
        pairs.append({"rankwise": a, "baseline": b, "order": "AB" if i % 2 == 0 else "BA"})
        print(
            f"{model} {precision} pair {i + 1}: rankwise {a['tok_s']:.0f} tok/s, baseline "
            f"{b['tok_s']:.0f} tok/s, ratio {a['tok_s'] / b['tok_s']:.3f}",
            flush=True,
        )
    arms = {
        "rankwise": "bf16 autocast" if autocast else "fp32",
        "baseline": "bf16 autocast (bf16=True)" if bf16 else "fp32",
    }
    return {
        "model": model,
        "precision": precision,
        "arms": arms,
        "settings": _settings(args),
        "pairs": pairs,
        **_summary(pairs),
    }


def _settings(args) -> dict:
    keys = ("steps", "batch", "seq_len", "rank", "lr", "warmup", "eval_batches", "pairs")
    return {k: getattr(args, k) for k in keys} | {"threads": torch.get_num_threads()}


def _summary(pairs: list[dict]) -> dict:
    def med(arm, key):
        return statistics.median(p[arm][key] for p in pairs)

    return {
        "ratio_end_to_end": statistics.median(
            p["rankwise"]["tok_s"] / p["baseline"]["tok_s"] for p in pairs
        ),
        "ratio_train_span": statistics.median(
            p["rankwise"]["tok_s_train_span"] / p["baseline"]["tok_s_train_span"] for p in pairs
        ),
        "median": {
            arm: {k: med(arm, k) for k in pairs[0][arm] if isinstance(pairs[0][arm][k], float)}
            for arm in ("rankwise", "baseline")
        },
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | precision: rankwise / Trainer | steps × batch × seq | pairs | tok/s rankwise | tok/s baseline | ratio "
        "(median of pairs) | train-span tok/s rankwise / baseline (ratio) | rankwise setup / "
        "teardown / overhead share | baseline setup / teardown / overhead share | "
        "mean train loss rankwise / baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, a, b = r["settings"], r["median"]["rankwise"], r["median"]["baseline"]
        arms = r.get("arms", {"rankwise": "fp32", "baseline": "fp32"})
        lines.append(
            f"| {r['model']} | {r.get('precision', 'fp32')}: {arms['rankwise']} / "
            f"{arms['baseline']} | {s['steps']} × {s['batch']} × {s['seq_len']} | {s['pairs']} | "
            f"{a['tok_s']:.0f} | {b['tok_s']:.0f} | {r['ratio_end_to_end']:.3f} | "
            f"{a['tok_s_train_span']:.0f} / {b['tok_s_train_span']:.0f} "
            f"({r['ratio_train_span']:.3f}) | "
            f"{a['setup']:.3f} s / {a['teardown']:.3f} s / {a['overhead_share']:.1%} | "
            f"{b['setup']:.3f} s / {b['teardown']:.3f} s / {b['overhead_share']:.1%} | "
            f"{a['mean_train_loss']:.4f} / {b['mean_train_loss']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "tiny"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny-steps", type=int, default=100, help="steps for the tiny model")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=4, help="even: as many AB as BA")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--precisions", nargs="+", default=["default", "fp32", "bf16"], choices=PRECISIONS
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few steps")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.models, args.tiny_steps, args.pairs, args.eval_batches = ["tiny"], 5, 1, 1
        args.precisions = ["default"]
        if args.out == OUT:  # a fresh folder unless --out names one
            args.out = Path(tempfile.mkdtemp(prefix="rankwise-throughput-"))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        steps = args.steps
        if model == "tiny":
            args.steps = args.tiny_steps
        loaded = load(model, args, args.out)
        for precision in args.precisions:
            rows.append(bench_model(model, args, args.out, precision, loaded))
        args.steps = steps
    (args.out / "throughput.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
