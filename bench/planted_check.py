"""Check that a planted-rank task's knee sits near k: train plain PEFT LoRA students.

For each rank (default k/4, k/2, k, 2k, 4k) a fresh LoRA on the task's base model is trained
on ``train.jsonl`` and evaluated on ``val.jsonl``; the best validation loss per rank is
printed next to the base and teacher losses. On a good task the loss falls steeply up to
r = k and is flat after it.

Settings follow FIELD.md's planted-rank measurement: AdamW lr 3e-3, fixed lora_alpha 8,
1,200 steps of 32 sequences × 32 tokens (~20 s per rank on 2 cores at hidden 64). alpha is
held fixed rather than 2r because with alpha = 2r the rule acts as a per-rank step size and
confounds the rank comparison (FIELD.md, "Alpha rule vs rank curve").

Usage::

    python -m bench.planted --k 8 && python -m bench.planted_check --k 8
    python -m bench.planted_check --k 8 --ranks 2 4 8 16 32 --steps 1200 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bench.planted import CACHE, TARGETS

ROOT = Path(__file__).resolve().parent


def load_split(path: Path, tokenizer) -> torch.Tensor:
    """One row of token ids per record (records of a task all have the same length)."""
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    return torch.tensor([tokenizer(t).input_ids for t in texts])


@torch.no_grad()
def evaluate(model, val: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    total = sum(model(input_ids=c, labels=c).loss.item() * len(c) for c in val.split(batch))
    model.train()
    return total / len(val)


def _lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_student(task: Path, rank: int, args) -> dict:
    """Train one LoRA of rank ``rank``; return its best and final validation loss."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(task / "model")
    train, val = (load_split(task / f"{s}.jsonl", tokenizer) for s in ("train", "val"))
    torch.manual_seed(args.seed)  # the same LoRA A initialisation stream for every rank
    base = AutoModelForCausalLM.from_pretrained(task / "model")
    config = LoraConfig(r=rank, lora_alpha=args.alpha, target_modules=list(TARGETS))
    model = get_peft_model(base, config)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, args.steps, max(1, args.steps // 20))
    )
    gen = torch.Generator().manual_seed(args.seed)
    start, best, curve = time.perf_counter(), math.inf, []
    model.train()
    for step in range(1, args.steps + 1):
        ids = train[torch.randint(len(train), (args.batch,), generator=gen)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, evaluate(model, val)))
            best = min(best, curve[-1][1])
    return {
        "rank": rank,
        "best_val": best,
        "final_val": curve[-1][1],
        "trainable": sum(p.numel() for p in params),
        "seconds": time.perf_counter() - start,
        "curve": curve,
    }


def default_ranks(k: int, max_rank: int) -> list[int]:
    """k/4, k/2, k, 2k, 4k, clipped to [1, max_rank], without repeats."""
    ranks = (max(1, min(max_rank, round(k * f))) for f in (0.25, 0.5, 1, 2, 4))
    return sorted(set(ranks))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, help="task bench/.cache/planted-k{k}")
    parser.add_argument("--task", type=Path, help="task folder (instead of --k)")
    parser.add_argument("--ranks", type=int, nargs="+", help="default: k/4 k/2 k 2k 4k")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--alpha", type=float, default=8.0, help="fixed lora_alpha")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if (args.k is None) == (args.task is None):
        parser.error("give exactly one of --k and --task")
    torch.set_num_threads(args.threads)
    task = args.task or CACHE / f"planted-k{args.k}"
    meta = json.loads((task / "task.json").read_text())
    k, loss = meta["k"], meta["losses"]
    ranks = args.ranks or default_ranks(k, meta["model"]["max_rank"])
    base_val, teacher_val = loss["base_val_with_eos"], loss["teacher_val_with_eos"]
    print(
        f"{task.name}: k={k}, hidden {meta['model']['hidden']}, val loss with EOS: "
        f"base {base_val:.4f}, teacher {teacher_val:.4f} nats/token",
        flush=True,
    )
    print(f"{'rank':>5} {'best val':>9} {'final':>7} {'gap closed':>10} {'params':>7} {'s':>5}")
    results = []
    for rank in ranks:
        r = train_student(task, rank, args)
        closed = (base_val - r["best_val"]) / (base_val - teacher_val)
        print(
            f"{rank:>5} {r['best_val']:>9.4f} {r['final_val']:>7.4f} {closed:>10.1%} "
            f"{r['trainable']:>7} {r['seconds']:>5.0f}",
            flush=True,
        )
        results.append(r | {"gap_closed": closed})
    if args.json:
        settings = {n: getattr(args, n) for n in ("steps", "batch", "lr", "alpha", "seed")}
        body = {"task": meta["name"], "k": k, "losses": loss, "settings": settings}
        args.json.write_text(json.dumps(body | {"results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
