"""What a rank costs the base model: forgetting against the rank, beside the gain.

For each task a grid over ``RANKS`` (rankwise's own search, its default retain set: 16 x 64
tokens sampled from the base model) records per rank the share of the improvement over the
base model and the forgetting: the retain-loss increase and KL(base || adapted). Tasks:
SmolLM2 on two corpora (the standard library's docstrings, the installed packages' READMEs;
``bench/corpora.py``) and one planted task of each generator (``bench/planted.py``,
``bench/planted2.py``: tiny bases, char-level). Three questions:

1. Does forgetting grow with the rank? (Spearman's rho of forgetting against r.)
2. Does the self-sampled retain set rank the adapters as held-back general text would? Each
   SmolLM2 adapter is measured again on the *other* corpus, which no trial of that run trained
   on (READMEs for a docstring run, docstrings for a README run): the rho between the two.
3. What does it cost? The retain evaluation's share of the search's wall time (sampling and
   the base's pass once, one pass per trial), and how far the cached top-K KL is below the
   exact KL (the base recomputed with the adapter disabled, all 49,152 tokens).

Usage::

    .venv/bin/python -m bench.forgetting            # all four tasks (~12 min on 2 CPU cores)
    .venv/bin/python -m bench.forgetting --tasks planted-k8
    .venv/bin/python -m bench.forgetting --report   # the tables from the saved rows
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import rankwise
from bench import corpora, harness, planted, planted2
from rankwise.records import SKIPPED

__all__ = ["RANKS", "TASKS", "run_task", "spearman", "table", "main"]

ROOT = Path(__file__).resolve().parent
OUT = ROOT / ".cache" / "runs" / "forgetting"
RANKS = [1, 4, 16, 64]
TASKS = ("smollm2-docstrings", "smollm2-readmes", "planted-k8", "planted2-k8")
HELD_BACK = {"smollm2-docstrings": "readmes", "smollm2-readmes": "docstrings"}


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (no ties expected; None for fewer than 3 points).

    >>> spearman([1, 2, 3, 4], [0.1, 0.3, 0.2, 0.4])
    0.8
    """
    if len(xs) < 3:
        return None
    rank = lambda v: {x: i for i, x in enumerate(sorted(v))}  # noqa: E731
    rx, ry = rank(xs), rank(ys)
    n = len(xs)
    d2 = sum((rx[x] - ry[y]) ** 2 for x, y in zip(xs, ys, strict=True))
    return round(1 - 6 * d2 / (n * (n * n - 1)), 4)


# -- the tasks ------------------------------------------------------------------------------
def corpus_records(name: str, smoke: bool) -> list[dict]:
    """A corpus as text records: the stdlib's docstrings or the packages' READMEs (smoke:
    two small made-up corpora of the same two kinds, read in milliseconds)."""
    if smoke:
        kind = "Return the value of x; raise KeyError" if name == "docstrings" else "Install it"
        return [{"text": f"{kind} ({i}), then see section {i % 7}."} for i in range(120)]
    if name == "docstrings":
        from rankwise.io.readers import stdlib_docstrings

        texts = stdlib_docstrings()
        return [{"text": t} for t in (texts[:400] if smoke else texts)]
    path = corpora.package_readmes(max_records=60 if smoke else 600)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def task_options(task: str, args) -> dict:
    """rankwise.search options of a task (``args.smoke``: a tiny model, seconds)."""
    if task.startswith("smollm2"):
        corpus = "docstrings" if task.endswith("docstrings") else "readmes"
        train = args.out / f"{corpus}.jsonl"
        records = corpus_records(corpus, args.smoke)[: args.records]
        train.write_text("".join(json.dumps(r) + "\n" for r in records))
        model = args.tiny_model if args.smoke else "smollm2"
        return {"model": str(model), "train": str(train), "seq_len": 32 if args.smoke else 64,
                "batch_size": 4, "max_steps": args.steps, "eval_every": args.steps // 2,
                "warmup_steps": 2, "lr": args.lr, "eval_batches": 8, "max_seeds": 1}  # fmt: skip
    gen = planted if task.startswith("planted-") else planted2
    k = int(task.rsplit("-k", 1)[1])
    folder = (
        gen.make_task(k, args.out / f"{task}-task", **gen.SMOKE) if args.smoke else gen.make_task(k)
    )
    meta = json.loads((folder / "task.json").read_text())
    return {"model": str(folder / "model"), "train": str(folder / "train.jsonl"),
            "val": str(folder / "val.jsonl"), "seq_len": meta["usage"]["seq_len"],
            "target_modules": list(meta.get("targets") or planted.TARGETS), "alpha": 8.0, "lr": 3e-2 if args.smoke else 3e-3,
            "batch_size": 16, "max_steps": args.planted_steps,
            "eval_every": max(1, args.planted_steps // 4), "warmup_steps": 2,
            "max_seeds": 1}  # fmt: skip


def run_task(task: str, args) -> dict:
    """One grid search with forgetting measured (``args.reuse``: the finished one in its
    folder), and its row of the table."""
    out = args.out / task
    if not (args.reuse and (out / "recommendation.json").is_file()):
        (out / "data" / "retain.safetensors").unlink(missing_ok=True)  # sampling is a cost too
        rankwise.search(strategy="grid", ranks=task_ranks(task, args), out=str(out),
                        quiet=True, force=True, max_forgetting=args.max_forgetting,
                        **task_options(task, args))  # fmt: skip
    from rankwise.storage.store import RunStore

    store = RunStore(out, readonly=True)
    retain, results = store.get_meta("retain"), store.results()
    spans = list(store.db.execute("SELECT MIN(started_at), MAX(finished_at) FROM trials "
                                  "WHERE key != 'base'"))[0]  # fmt: skip
    store.close()
    # The search's wall time: its trials from the store's clock, the base model's evaluation
    # and the retain set's sampling and base pass before them (model loading not counted;
    # the base record may be older, from a search that was resumed).
    base = next(r.wall_seconds for r in results if r.key == "base")
    wall = spans[1] - spans[0] + base + retain["seconds"]
    doc = json.loads((out / "recommendation.json").read_text())
    trials = [t for t in results if t.forgetting is not None and t.on_curve]
    share = {s["rank"]: s.get("share") for s in doc["scores"]}
    per_rank = {t.rank: {"forgetting": t.forgetting, "kl": t.forgetting_kl,
                         "share": share.get(t.rank), "val": t.best_val_loss,
                         "skipped": t.status == SKIPPED} for t in trials}  # fmt: skip
    spent = retain["seconds"] + sum(t.retain_seconds for t in results)
    row = {
        "task": task, "ranks": per_rank, "wall": wall, "retain_share": spent / wall,
        "retain_seconds": spent, "sampling_seconds": retain["seconds"], "rank": doc["rank"],
        "best_rank": doc["best_rank"], "reason": doc["reason"],
        "top_k_mass": retain.get("top_k_mass"),
        "rho_rank": spearman(list(per_rank), [v["forgetting"] for v in per_rank.values()]),
    }  # fmt: skip
    if task in HELD_BACK:
        row |= held_back(out, trials, HELD_BACK[task], args)
    return row


def task_ranks(task: str, args) -> list[int]:
    """``args.ranks``, up to what the task's smallest target layer holds (planted2: 48)."""
    if args.smoke or task.startswith("smollm2"):
        return args.ranks
    gen = planted if task.startswith("planted-") else planted2
    meta = json.loads((gen.make_task(int(task.rsplit("-k", 1)[1])) / "task.json").read_text())
    cap = meta["model"].get("max_rank") or max(args.ranks)
    return [r for r in args.ranks if r <= cap] + ([cap] if max(args.ranks) > cap else [])


# -- held-back text and the exact KL ---------------------------------------------------------
def held_back(run_dir: Path, trials: list, corpus: str, args) -> dict:
    """Each trial's adapter measured on a corpus the run never trained on, and the exact KL
    on the run's own retain set against the cached top-K KL."""
    from rankwise.config import DataConfig, ModelConfig
    from rankwise.io.models import load_model
    from rankwise.storage.rundir import RunDir
    from rankwise.storage.store import RunStore
    from rankwise.training.adapter import TrialContext
    from rankwise.training.retain import RetainSet, from_records, measure_adapter

    store = RunStore(run_dir, readonly=True)
    specs = {t.key: store.spec(t.key) for t in trials}
    store.close()
    autocast = next(iter(specs.values())).train.autocast
    model, tokenizer, device = load_model(
        ModelConfig(model=str(args.tiny_model) if args.smoke else "smollm2")
    )
    ctx = TrialContext(model, tokenizer, device, None)
    other = from_records(corpus_records(corpus, args.smoke), "text", DataConfig(), tokenizer,
                         model, device, seed=1, autocast=autocast, source=corpus)  # fmt: skip
    own = _own_retain(run_dir, RetainSet)
    held, exact = {}, {}
    for t in trials:
        folder = RunDir(run_dir).trial_adapter(t.key)
        held[t.rank] = measure_adapter(ctx, specs[t.key], folder, other)["forgetting"]
        exact[t.rank] = exact_kl(ctx, specs[t.key], folder, own)
    ranks = sorted(held)
    return {
        "held_back": corpus, "held": held, "exact_kl": exact,
        "rho_held": spearman([t.forgetting for t in sorted(trials, key=lambda t: t.rank)],
                             [held[r] for r in ranks]),
    }  # fmt: skip


def _own_retain(run_dir: Path, retain_set):
    from safetensors import safe_open

    path = run_dir / "data" / "retain.safetensors"
    with safe_open(str(path), "pt") as f:
        key = (f.metadata() or {})["key"]
    return retain_set.load(path, key)


@torch.no_grad()
def exact_kl(ctx, spec, folder: Path, retain) -> float:
    """Mean KL(base || adapted) over every token of the vocabulary: the base recomputed with
    the adapter disabled (what the cached top-K bound is checked against)."""
    from rankwise.training.adapter import _warm_start, attached
    from rankwise.training.evaluate import _autocast
    from rankwise.training.retain import _saved_spec

    spec = _saved_spec(spec, folder)
    total, n = 0.0, 0
    with attached(ctx.model, spec) as peft_model:
        _warm_start(peft_model, str(folder))
        peft_model.eval()
        for start in range(0, retain.ids.shape[0], 8):
            x = retain.ids[start : start + 8].to(ctx.device)
            mask = retain.labels[start : start + 8, 1:] != -100
            with _autocast(ctx.device, spec.train.autocast):
                q = peft_model(input_ids=x).logits[:, :-1]
                with peft_model.disable_adapter():
                    p = peft_model(input_ids=x).logits[:, :-1]
            logp, logq = p.float().log_softmax(-1), q.float().log_softmax(-1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            total += float((kl * mask).sum())
            n += int(mask.sum())
    return total / max(n, 1)


# -- the tables -----------------------------------------------------------------------------
def _f(x, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)


def _per_rank(row: dict, r: str) -> list:
    v = row["ranks"][r]
    mark = " (rec.)" if int(r) == row["rank"] else " (best)" if int(r) == row["best_rank"] else ""
    held = (row.get("held") or {}).get(r, (row.get("held") or {}).get(str(r)))
    exact = (row.get("exact_kl") or {}).get(r, (row.get("exact_kl") or {}).get(str(r)))
    share = _f(100 * v["share"], ".1f") + "%" if v["share"] is not None else "-"
    return [row["task"], f"{r}{mark}", share, _f(v["forgetting"], "+.4f"), _f(v["kl"]),
            _f(exact), _f(held, "+.4f")]  # fmt: skip


def table(rows: list[dict]) -> str:
    head = ["task", "r", "share of improvement", "forgetting (retain-loss increase)",
            "KL (top-256 bound)", "exact KL", "held-back increase"]  # fmt: skip
    cells = [_per_rank(row, r) for row in rows
             for r in sorted(row["ranks"], key=int)]  # fmt: skip
    return harness.table(head, cells)


def _totals(row: dict) -> list:
    by = {int(r): v for r, v in row["ranks"].items()}
    rec, best = row["rank"], row["best_rank"]
    pick = f"r={rec} ({_f(by.get(rec, {}).get('forgetting'), '+.4f')})" if rec else "none"
    return [row["task"], _f(row["rho_rank"], "+.2f"), _f(row.get("rho_held"), "+.2f"),
            f"{100 * row['retain_share']:.1f}% ({row['retain_seconds']:.0f} of "
            f"{row['wall']:.0f} s)", _f(row["top_k_mass"], ".2f"),
            f"{pick} vs r={best} ({_f(by.get(best, {}).get('forgetting'), '+.4f')})"]  # fmt: skip


def summary(rows: list[dict]) -> str:
    head = ["task", "rho(forgetting, r)", "rho(self-sampled, held-back)",
            "retain eval share of wall time", "top-256 mass",
            "recommended r (forgetting) vs best r (forgetting)"]  # fmt: skip
    return harness.table(head, map(_totals, rows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--steps", type=int, default=24, help="SmolLM2 steps per trial (8x... 4x64)")
    p.add_argument("--planted-steps", type=int, default=200)
    p.add_argument("--records", type=int, default=300, help="SmolLM2 training records")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-forgetting", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--report", action="store_true")
    p.add_argument("--reuse", action="store_true", help="take finished searches from --out")
    p.add_argument("--smoke", action="store_true", help="a tiny model, seconds (for tests)")
    args = p.parse_args(argv)
    args.ranks, args.tiny_model = list(RANKS), None
    if args.smoke:
        from rankwise.testing import save_tiny_model

        if args.out == OUT:
            args.out = Path(tempfile.mkdtemp(prefix="rankwise-forgetting-"))
        args.tiny_model = save_tiny_model(args.out / "tiny-model")
        args.ranks, args.steps, args.records, args.lr = [1, 4, 16], 6, 80, 3e-2
        args.threads = 1  # tiny matrices: more threads only wait on each other
        args.tasks = [t for t in args.tasks if t.startswith("smollm2")][:1] or [
            "smollm2-docstrings"
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "forgetting.json"
    if args.report:
        rows = json.loads(saved.read_text())
    else:
        torch.set_num_threads(args.threads)
        rows = []
        for task in args.tasks:
            rows.append(run_task(task, args))
            print(summary(rows[-1:]).splitlines()[-1], flush=True)
            # Each task as it ends (a later one may fail), with those of earlier runs.
            old = json.loads(saved.read_text()) if saved.exists() else []
            kept = {r["task"]: r for r in old} | {rows[-1]["task"]: rows[-1]}
            saved.write_text(json.dumps(list(kept.values()), indent=2) + "\n")
        rows = json.loads(saved.read_text())
    if not args.smoke:
        harness.write_results("forgetting", rows, settings={"out": str(args.out)})
    print(table(rows))
    print()
    print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
