"""Recipe fidelity: does the schedule, DoRA or NEFTune move the rank a task needs?

Issue 31, item 5. A recipe's ``lr_scheduler: cosine``, ``peft_use_dora: true`` or
``neftune_noise_alpha: 5`` is now trained as written (``--lr-scheduler``, ``--use-dora``,
``--neftune-alpha``). Whether that matters for the *rank* is measured here: per task, one
real ``rankwise.search(strategy="grid", seeds=1, max_seeds=1)`` per variant, each variant
the default (linear warm-up and decay, plain LoRA, no noise) with one thing changed:

- ``linear`` (the default), ``cosine`` (``--lr-scheduler cosine``);
- ``dora`` (``--use-dora``);
- ``neftune`` (``--neftune-alpha 5``, the NEFTune paper's and axolotl's usual value);
- on the planted tasks also ``lora-qvu`` and ``dora-qvu``: LoRA and DoRA on q/v/up only.
  Their bases have an all-zero row in each down_proj, where DoRA's magnitude starts at 0
  and PEFT's forward is NaN (see :data:`VARIANTS`), so DoRA is compared there on the same
  targets without down_proj.

Tasks:

- ``planted-k4``, ``far-off-k8``: ``bench/stability.py``'s tasks, trained as its pools are
  (:data:`bench.stability.TRAIN`: lr 3e-2, alpha 8, 500 x 8, warm-up 25, fp32), r = 1..16.
- ``smollm2-docstrings``: ``make demo``'s search (the embedded SmolLM2-135M on
  stdlib-docstrings, 48 steps of 4 x 64 tokens, lr 2e-3), r = 1, 2, 4, 8.

Each row reports the answer (the grid's recommendation under the default criterion), its
val loss and the curve (best val loss per rank). One seed per rank: a difference between
variants smaller than the stability pools' seed-to-seed spread (bench/RESULTS.md,
"Stability") is noise.

Usage::

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python -m bench.recipe_fidelity \\
        > bench/.cache/recipe_fidelity.log 2>&1          # every task and variant
    .venv/bin/python -m bench.recipe_fidelity --tasks planted-k4 --variants linear cosine
    .venv/bin/python -m bench.recipe_fidelity --render   # the table from the JSON only
    .venv/bin/python -m bench.recipe_fidelity --smoke    # < 1 min, for tests

Run folders: ``bench/.cache/runs/recipe_fidelity/<task>/<variant>/`` (a rerun resumes a
search's finished trials); a finished variant's row is kept in
``bench/.cache/recipe_fidelity/<task>/<variant>.json`` and not searched again, so the
benchmark can be stopped and restarted. After each variant every finished row is written to
``bench/results/recipe_fidelity.json`` and the table rendered from it to
``bench/results/recipe_fidelity.md``: a partial run is a partial table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if not __package__:  # run as a file (bench/recipe_fidelity.py): make `bench` importable
    sys.path.insert(0, str(ROOT.parent))

from bench import harness, stability  # noqa: E402

NAME = "recipe_fidelity"
CACHE = ROOT / ".cache" / NAME
RUNS = ROOT / ".cache" / "runs" / NAME

# One change from the default each; the keywords are rankwise.search's (the CLI's flags).
# The planted bases have an all-zero row in every down_proj (bench/planted.py: nothing writes
# to the bias channel), where DoRA's weight norm is 0 and PEFT's magnitude / norm is 0/0: its
# forward is NaN before any step. So on them DoRA is also compared with LoRA on q/v/up only
# (PLANTED_VARIANTS), the same targets for both.
QVU = ["q_proj", "v_proj", "up_proj"]
VARIANTS = {
    "linear": {},
    "cosine": {"lr_scheduler": "cosine"},
    "dora": {"use_dora": True},
    "neftune": {"neftune_alpha": 5.0},
    "lora-qvu": {"target_modules": QVU},
    "dora-qvu": {"target_modules": QVU, "use_dora": True},
    # At the LoRA rate (3e-2) DoRA on q/v/up ended 0.09-0.28 nats above LoRA: is it the rate?
    "lora-qvu-lr1e-2": {"target_modules": QVU, "lr": 1e-2},
    "dora-qvu-lr1e-2": {"target_modules": QVU, "use_dora": True, "lr": 1e-2},
}
MAIN_VARIANTS = ("linear", "cosine", "dora", "neftune")
PLANTED_VARIANTS = MAIN_VARIANTS + ("lora-qvu", "dora-qvu")
RATE_VARIANTS = ("lora-qvu-lr1e-2", "dora-qvu-lr1e-2")
BASELINE = "linear"
REFERENCE = {"dora-qvu": "lora-qvu", "dora-qvu-lr1e-2": "lora-qvu-lr1e-2"}
"""What a variant's answer is compared with, when not the default (:data:`BASELINE`)."""
LABELS = {
    "linear": "linear, LoRA, no noise (default)",
    "cosine": "cosine schedule",
    "dora": "DoRA",
    "neftune": "NEFTune alpha 5",
    "lora-qvu": "LoRA on q/v/up (no down_proj)",
    "dora-qvu": "DoRA on q/v/up (no down_proj)",
    "lora-qvu-lr1e-2": "LoRA on q/v/up, lr 1e-2",
    "dora-qvu-lr1e-2": "DoRA on q/v/up, lr 1e-2",
}
# The Makefile's demo, option for option (48 steps x 4 x 64 tokens, 4 evaluations of 16
# batches, 100 records of the standard library's docstrings).
DEMO = {
    "model": "smollm2",
    "train": "stdlib-docstrings",
    "seq_len": 64,
    "batch_size": 4,
    "max_steps": 48,
    "eval_every": 12,
    "lr": 2e-3,
    "warmup_steps": 4,
    "max_examples": 100,
    "eval_batches": 16,
}


@dataclass(frozen=True)
class Bench:
    """A task: the options of its searches (model and data included) and the ranks."""

    name: str
    ranks: list[int]
    options: dict = field(default_factory=dict)
    planted: str | None = None
    """A ``bench.stability.TASKS`` name: model, data and targets come from its folder."""
    k: int | None = None
    variants: tuple[str, ...] = MAIN_VARIANTS
    """The :data:`VARIANTS` this task is searched with."""

    def search_options(self, smoke_root: Path | None = None) -> dict:
        """Everything ``rankwise.search`` gets but the variant, the grid and ``out``."""
        if self.planted is None:
            return dict(self.options)
        task = stability.TASKS.get(self.planted) or stability.Task(self.planted, self.k)
        folder = task.make(smoke_root is not None, smoke_root)
        meta = json.loads((folder / "task.json").read_text())
        return {
            "model": str(folder / "model"),
            "train": str(folder / "train.jsonl"),
            "val": str(folder / "val.jsonl"),
            "seq_len": meta["usage"]["seq_len"],  # one record + EOS per block
            "target_modules": task.targets(),
        } | self.options


TASKS = {
    b.name: b
    for b in (
        Bench(
            "planted-k4",
            [1, 2, 4, 8, 16],
            stability.TRAIN,
            "planted-k4",
            4,
            PLANTED_VARIANTS + RATE_VARIANTS,
        ),  # fmt: skip
        Bench("far-off-k8", [1, 2, 4, 8, 16], stability.TRAIN, "far-off-k8", 8, PLANTED_VARIANTS),
        Bench("smollm2-docstrings", [1, 2, 4, 8], DEMO),
    )
}
SMOKE = Bench("planted-k2-smoke", [1, 2], stability.SMOKE_TRAIN, "planted-k2", 2, PLANTED_VARIANTS)


# -- measuring ------------------------------------------------------------------------------
def recorded(run_dir: Path, key: str) -> dict:
    """What the trial ``key`` was trained with, as its stored spec says (not as asked)."""
    from rankwise.storage.store import RunStore

    store = RunStore(run_dir, readonly=True)
    try:
        spec = store.spec(key)
    finally:
        store.close()
    if spec is None:
        return {}
    return {"lr_scheduler": spec.train.lr_scheduler, "use_dora": spec.lora.use_dora,
            "neftune_alpha": spec.train.neftune_alpha,
            "target_modules": spec.lora.target_modules}  # fmt: skip


def row_of(bench: Bench, variant: str, result, wall: float, cpu: float) -> dict:
    """One variant's search as plain data: the answer, its loss, the curve, what was trained."""
    rec = result.recommendation
    on_curve = [t for t in result.trials if t.on_curve]
    curve = {str(s.rank): s.mean for s in result.scores}
    first = next((t.key for t in on_curve), None)
    return {
        "task": bench.name,
        "k": bench.k,
        "variant": variant,
        "changes": VARIANTS[variant],
        "ranks": bench.ranks,
        "answer": rec.rank,
        "answer_loss": rec.loss,
        "undecided": rec.undecided,
        "best_rank": rec.best_rank,
        "best_loss": rec.best_loss,
        "base_loss": rec.base_loss,
        "criterion": rec.criterion,
        "curve": curve,
        "failed": {str(t.rank): t.reason for t in on_curve if not t.ok},
        "recorded": recorded(result.run_dir, first) if first else {},
        "trials": len(on_curve),
        "train_tokens": sum(t.train_tokens for t in on_curve),
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),
        "run_dir": str(result.run_dir),
    }


def measure(bench: Bench, variant: str, runs: Path, cache: Path, smoke_root=None) -> dict:
    """The variant's row: read back when its search finished before, else searched now."""
    done = cache / bench.name / f"{variant}.json"
    options = bench.search_options(smoke_root) | VARIANTS[variant]
    if done.exists():
        row = json.loads(done.read_text())
        if row.get("options") == json.loads(json.dumps(options)):
            print(f"{bench.name} {variant}: done before ({done})", flush=True)
            return row
    from rankwise import search

    wall, cpu = time.perf_counter(), time.process_time()
    result = search(
        out=str(runs / bench.name / variant), quiet=True, strategy="grid", ranks=bench.ranks,
        seeds=1, max_seeds=1, **options,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    row = row_of(bench, variant, result, wall, cpu) | {"options": options}
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_text(json.dumps(row, indent=1) + "\n")
    print(f"{bench.name} {variant}: r={row['answer']} ({fmt(row['answer_loss'])}), curve "
          f"{' '.join(fmt(v) for v in curve_of(row))}, {wall:.0f} s", flush=True)  # fmt: skip
    return row


def finished_rows(cache: Path, benches, variants) -> list[dict]:
    """Every row stored in ``cache`` for ``benches`` x ``variants``, in table order."""
    rows = []
    for bench in benches:
        for variant in (v for v in variants if v in bench.variants):
            path = cache / bench.name / f"{variant}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
    return rows


def settings(benches, variants) -> dict:
    return {
        "variants": {v: VARIANTS[v] for v in variants},
        "tasks": {b.name: {"ranks": b.ranks, "options": b.options, "planted": b.planted,
                           "variants": [v for v in variants if v in b.variants]}
                  for b in benches},
        "search": {"strategy": "grid", "seeds": 1, "max_seeds": 1, "criterion": "default"},
    }  # fmt: skip


def write(rows: list[dict], out: Path, benches, variants) -> Path:
    """``out/recipe_fidelity.json`` (rows, settings, environment) and the table from it."""
    path = harness.write_results(NAME, rows, out, settings(benches, variants))
    (out / f"{NAME}.md").write_text(render(harness.read_results(NAME, out)))
    return path


# -- the table ------------------------------------------------------------------------------
def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def curve_of(row: dict) -> list[float | None]:
    return [row["curve"].get(str(r)) for r in row["ranks"]]


def answer_label(row: dict) -> str:
    """The rank, ``?`` when the noise left the answer open, ``none`` when no rank was chosen."""
    rank = "none" if row["answer"] is None else f"r={row['answer']}"
    return rank + ("?" if row["undecided"] else "")


def failures(failed: dict[str, str]) -> str:
    """The failed ranks, grouped by reason: ``r=1, 2, 4 unstable: ...``."""
    by: dict[str, list[str]] = {}
    for rank, why in failed.items():
        by.setdefault(why, []).append(rank)
    return "; ".join(f"r={', '.join(ranks)} {why}" for why, ranks in by.items())


def render(doc: dict) -> str:
    """The markdown table of ``recipe_fidelity.json``, from the document alone."""
    rows = doc["results"]
    if not rows:
        return "(no variant measured yet)\n"
    ranks = sorted({int(r) for row in rows for r in row["ranks"]})
    by = {(row["task"], row["variant"]): row for row in rows}
    lines = [
        "| task | variant | answer | answer's val loss | vs reference | base | "
        + " | ".join(f"r={r}" for r in ranks) + " | wall |",
        "|---|---|---|---|---|---|" + "---|" * len(ranks) + "---|",
    ]  # fmt: skip
    for row in rows:
        ref = by.get((row["task"], REFERENCE.get(row["variant"], BASELINE)))
        delta = "-"
        if (
            ref is not None
            and row is not ref
            and None not in (row["answer_loss"], ref["answer_loss"])
        ):
            delta = f"{row['answer_loss'] - ref['answer_loss']:+.4f}"
        cells = []
        for r in ranks:
            v = row["curve"].get(str(r)) if r in row["ranks"] else None
            mark = "**" if r == row["answer"] and v is not None else ""
            cells.append(f"{mark}{fmt(v)}{mark}" if r in row["ranks"] else "")
        task = row["task"] + (f" (k={row['k']})" if row.get("k") else "")
        lines.append(
            f"| {task} | {LABELS.get(row['variant'], row['variant'])} | {answer_label(row)} | "
            f"{fmt(row['answer_loss'])} | {delta} | {fmt(row['base_loss'])} | "
            + " | ".join(cells) + f" | {duration(row['wall_seconds'])} |"
        )  # fmt: skip
    env = doc.get("environment", {})
    failed = [f"{row['task']}, {LABELS.get(row['variant'], row['variant'])}: "
              + failures(row["failed"]) for row in rows if row["failed"]]  # fmt: skip
    lines += ["", "Failed trials: " + " · ".join(failed) + "."] if failed else []
    lines += [
        "",
        "Best val loss per rank (nats/token, one seed; the answer in bold), the grid's "
        "recommendation under the default criterion ('?': the noise left it open), and the "
        "answer's val loss minus its reference's (the default; for DoRA on q/v/up, LoRA on "
        "q/v/up at the same rate). "
        f"Measured {env.get('date', '?')} on {env.get('cpu', '?')} (torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}). Generated by "
        "`python -m bench.recipe_fidelity --render` from bench/results/recipe_fidelity.json.",
    ]
    return "\n".join(lines) + "\n"


# -- entry point ----------------------------------------------------------------------------
def run(benches, variants, runs: Path, cache: Path, out: Path, smoke_root=None,
        table=(list(TASKS.values()), list(VARIANTS))) -> dict:  # fmt: skip
    """Every variant of every task, the main variants of all tasks first; after each, every
    row finished in ``cache`` (of ``table``'s tasks and variants, asked for now or before)
    is written to ``out``."""
    for group in (MAIN_VARIANTS, PLANTED_VARIANTS[len(MAIN_VARIANTS) :], RATE_VARIANTS):
        for bench in benches:
            for variant in (v for v in group if v in variants and v in bench.variants):
                measure(bench, variant, runs, cache, smoke_root)
                write(finished_rows(cache, *table), out, *table)
    return harness.read_results(NAME, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--render", action="store_true", help="the table from the JSON only")
    parser.add_argument("--smoke", action="store_true", help="a tiny task, < 1 min")
    parser.add_argument("--root", type=Path, default=None,
                        help="--smoke: the folder for its task, runs and results (default: a "
                             "new temporary folder)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.render:
        print(render(harness.read_results(NAME)), end="")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    if args.smoke:
        root = args.root or Path(tempfile.mkdtemp(prefix="rankwise-recipe-fidelity-"))
        doc = run([SMOKE], args.variants, root / "runs", root / "cache", root / "results", root,
                  table=([SMOKE], list(VARIANTS)))  # fmt: skip
        print(render(doc) + f"\nresults: {root / 'results'}")
        return 0
    benches = [TASKS[t] for t in args.tasks]
    print(render(run(benches, args.variants, RUNS, CACHE, harness.RESULTS)), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
