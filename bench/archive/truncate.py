"""One rank curve from one training at the top rank: SVD truncations of the r_max adapter.

Issue "Search cost, second attempt", lever 3. Train r_max once; truncate its adapter by SVD
to every smaller candidate rank; evaluate each truncation (optionally after a short warm
fine-tune); take the knee of that curve with rankwise's default criterion; compare with the
grid's answer. Then deliver an adapter at the chosen rank: a final trial warm-started from
its truncation for a share of the steps, set beside the ordinary grid trial at that rank.

Nothing is trained at r_max here: the r = 32 trials of the stability pools
(``bench/stability.py``, ``bench/.cache/stability/<task>.json``, run folders in
``bench/.cache/runs/stability/<task>/``) are the r_max trainings. For each task and seed s:

1. **Truncation.** The saved best checkpoint of ``r32-s{s}`` (a PEFT folder, lora_alpha 8)
   is truncated per adapted module: ΔW = (alpha/32)·B·A in float64, its top-r SVD
   U_r S_r V_rᵀ, and the rank-r adapter B' = U_r·√S_r·√(r/alpha), A' = √S_r·V_rᵀ·√(r/alpha),
   so (alpha/r)·B'A' = ΔW_r, the best rank-r approximation (Eckart-Young). Written as a PEFT
   folder (same keys, r = r, lora_alpha 8) under ``bench/.cache/truncate/adapters/``.
2. **Evaluation.** Each truncation is loaded on the model with rankwise's own
   ``attached`` + warm start and scored by ``rankwise.training.evaluate.measure`` on the run
   folder's validation blocks, with the trial's TrialSpec (from ``trials.sqlite``): the
   same blocks, batches and per-block losses (``val_blocks``) as the grid's trials. Check
   (per task and seed, must hold): the r32 adapter as saved reproduces the stored best val
   loss, and its SVD "truncation" to r = 32 reproduces it, both within 1e-5.
3. **Warm fine-tune** (``+5%``, ``+10%``): a trial (``run_trial``) at rank r warm-started from
   the truncation (``TrainSpec.init_adapter``) for w of the pool's steps (round(w ·
   max_steps)), at the pool's lr (fresh AdamW, linear decay), ``warmup_steps`` 1, one
   evaluation at the end; same seed, so the first steps of the r_max trial's data order.
   ``+10% at lr/10``: the same at a tenth of the pool's lr (added after the pool's lr turned
   out to knock the converged large-rank truncations off their optimum).
4. **Answers.** Each curve (r = 1..16 from the variant, r = 32 the r_max trial itself, one
   seed, per-block losses) is told to a ``Grid`` and ``recommend``-ed with ``Criterion()``
   (knee, 1% of the base model's gap, base = the pool's). Compared with: the grid over all
   6 pool seeds (``stability.replay(pool, "grid, all N seeds", ...)``), the grid on seed s
   alone, and the new default ladder per outer seed 1-5 (``stability.replay``).
5. **Delivered adapter.** At each rank a variant chose: an ordinary trial warm-started from
   the (pure) truncation for 50% (and 25%) of the steps, the pool's warm-up and evaluation
   points (as ``rankwise``'s ``FinalTrial`` does), against the ordinary pool trial at that
   rank and seed, and the seed noise there (std over the pool's 6 seeds).

Tokens are counted in trials (one trial = max_steps × batch × seq_len, the r32 trial's):
r_max trial 1.0 + warm fine-tunes (w × 5 ranks) + the final (0.5). For reference the grid
with one seed is 6.0, the new default ladder its replayed tokens.

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.archive.truncate                    # 5 tasks, seeds 0-2
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.archive.truncate --seeds 3 4 5 --no-final  # curves only
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.archive.truncate --tasks planted-k4 --seeds 0 1
    .venv/bin/python -m bench.archive.truncate --report                           # tables, no training

(``.venv/bin/python bench/archive/truncate.py ...`` works as well.) About 30-110 s of one shared core
per task and seed (curves only: ~30 s).

Results go to ``bench/.cache/truncate/<task>.json``, written after every measurement; a
rerun resumes (finished measurements are not repeated).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # bench/ (this file is in bench/archive/)
if not __package__:  # run as a file (bench/archive/truncate.py): make `bench` importable
    sys.path.insert(0, str(ROOT.parent))

from bench import stability  # noqa: E402
from rankwise.core.criteria import Criterion, recommend  # noqa: E402
from rankwise.core.strategies import Grid  # noqa: E402
from rankwise.records import TrialResult  # noqa: E402

CACHE = ROOT / ".cache" / "truncate"
RMAX = 32
RANKS = [1, 2, 4, 8, 16]  # the truncations (r_max itself is the trial)
# Warm fine-tunes: name -> (share of the pool's steps, factor on the pool's lr). The last is
# an extra beyond the plan: the pool's peak lr, with a fresh AdamW, knocks a converged
# adapter away from its optimum (the r_max trial ended at lr ~0).
WARM = {"w5": (0.05, 1.0), "w10": (0.10, 1.0), "w10-lr0.1": (0.10, 0.1)}
WARM_WARMUP = 1  # warm-up steps of a warm fine-tune
FINAL = (0.5, 0.25)  # final trial from the truncation: shares of the pool's steps
CHECK_TOL = 1e-5
VARIANTS = ["trunc", *WARM]
LABEL = {"trunc": "truncation", "w5": "+5% warm", "w10": "+10% warm",
         "w10-lr0.1": "+10% warm at lr/10"}  # fmt: skip


# -- SVD truncation (torch only) -----------------------------------------------------------
def svd_truncate(a, b, alpha: float, r: int):
    """(A', B') of rank ``r`` with (alpha/r)·B'·A' the best rank-r approximation of the
    update ΔW = (alpha/r_max)·B·A of ``a`` (r_max × in) and ``b`` (out × r_max). In float64;
    returned in the dtype of ``a``/``b``."""
    import torch

    r_max = a.shape[0]
    if not 1 <= r <= min(b.shape[0], a.shape[1]):
        raise ValueError(f"rank {r} outside [1, {min(b.shape[0], a.shape[1])}]")
    dw = (alpha / r_max) * (b.double() @ a.double())
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    root = s[:r].sqrt() * math.sqrt(r / alpha)
    b2 = u[:, :r] * root
    a2 = root[:, None] * vh[:r]
    return a2.to(a.dtype).contiguous(), b2.to(b.dtype).contiguous()


def truncate_state(state: dict, alpha: float, r: int) -> dict:
    """A PEFT LoRA state dict (``...lora_A.weight`` / ``...lora_B.weight`` pairs, any rank)
    truncated by SVD to rank ``r`` with the same keys and alpha."""
    out = {}
    for key, a in state.items():
        if ".lora_A." not in key:
            if ".lora_B." not in key:
                out[key] = a  # anything else (none for these adapters) is kept
            continue
        kb = key.replace(".lora_A.", ".lora_B.")
        out[key], out[kb] = svd_truncate(a, state[kb], alpha, r)
    return out


def write_truncation(source: Path, out: Path, r: int) -> Path:
    """The PEFT adapter folder ``source`` truncated to rank ``r`` in ``out`` (reused when
    already written)."""
    from safetensors.torch import load_file, save_file

    model_file = out / "adapter_model.safetensors"
    if model_file.exists() and (out / "adapter_config.json").exists():
        return out
    config = json.loads((source / "adapter_config.json").read_text())
    if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{source}: rsLoRA / rank or alpha patterns are not handled here")
    state = load_file(str(source / "adapter_model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    save_file(truncate_state(state, float(config["lora_alpha"]), r), str(out / "tmp.safetensors"),
              metadata={"format": "pt"})  # fmt: skip
    (out / "adapter_config.json").write_text(json.dumps(config | {"r": r}, indent=2) + "\n")
    (out / "tmp.safetensors").rename(model_file)  # last: marks a complete folder
    return out


# -- measurements (torch) ------------------------------------------------------------------
def pool_spec(task: str, pool: dict, rank: int, seed: int):
    """The stored TrialSpec of the pool's trial r{rank}-s{seed}, its paths rebased on the
    pool's own folders: the pool's model (``options.model``), the run folder's ``data/`` and
    ``trials/<key>/adapter``. (The hot-head-k8 run folder's store names far-off-k8's model,
    data and adapters, the folder it was trained under; its numbers are hot-head-k8's, and
    the check in :func:`measure_task` confirms the rebased paths reproduce them.)"""
    spec = stability.stored_spec(stability.RUNS / task, rank, seed)
    run = stability.RUNS / task
    return spec.replace(
        model=spec.model | {"model": pool["options"]["model"]}, data_dir=str(run / "data"),
        adapter_dir=str(run / "trials" / spec.key / "adapter"),
    )  # fmt: skip


def at_rank(spec, r: int, key: str, **train):
    """``spec`` (an r_max trial's) at rank ``r``: same data, blocks, seed and evaluation;
    nothing saved (the pool's adapter folders stay as they are)."""
    return spec.replace(
        key=key, rank=r, lora=spec.lora.replace(r=r), train=spec.train.replace(**train),
        adapter_dir=None, group="truncate",
    )  # fmt: skip


def from_truncation(spec, r: int, key: str, truncation: Path, steps: int, **train):
    """A trial at rank ``r`` warm-started from ``truncation`` for ``steps`` steps."""
    return at_rank(spec, r, key, init_adapter=str(truncation), max_steps=steps, **train)


def evaluate_adapter(spec, ctx, folder: Path) -> dict:
    """Val loss and per-block losses of the PEFT adapter ``folder`` (rank ``spec.rank``), as
    a trial of ``spec`` measures them."""
    from rankwise.training.adapter import _warm_start, attached
    from rankwise.training.evaluate import grouped, measure

    t = time.perf_counter()
    blocks: list[float] = []
    with attached(ctx.model, spec) as peft_model:
        _warm_start(peft_model, str(folder))
        loss, _ = measure(peft_model, ctx, spec, blocks)
    return {"best_val_loss": loss, "val_blocks": grouped(blocks), "train_tokens": 0,
            "steps": 0, "wall_seconds": time.perf_counter() - t}  # fmt: skip


def train_from(spec, ctx) -> dict:
    from rankwise.training.trial import run_trial

    res = run_trial(spec, ctx)
    if not res.ok:
        raise RuntimeError(f"{spec.key}: {res.status} {res.reason}")
    return {"best_val_loss": res.best_val_loss, "val_blocks": list(res.val_blocks),
            "train_tokens": res.train_tokens, "steps": res.steps, "best_step": res.best_step,
            "val_curve": [list(p) for p in res.val_curve],
            "wall_seconds": res.wall_seconds}  # fmt: skip


class Cache:
    """``bench/.cache/truncate/<task>.json``: every measurement by key, saved at once."""

    def __init__(self, path: Path, head: dict):
        self.path = path
        old = json.loads(path.read_text())["entries"] if path.exists() else {}
        self.data = head | {"entries": old}

    def get(self, key: str, make, *args):
        """The entry ``key``, measured by ``make(*args)`` when missing."""
        if key not in self.data["entries"]:
            self.data["entries"][key] = make(*args)
            self.save()
        return self.data["entries"][key]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.rename(self.path)


def measure_task(task: str, seeds: list[int], final: bool, log=print) -> dict:
    from rankwise.training.adapter import TrialContext

    pool = stability.load_pool(stability.POOLS / f"{task}.json")
    head = {"task": task, "k": pool["k"], "base_loss": pool["base_loss"], "r_max": RMAX,
            "ranks": RANKS, "warm": WARM, "warm_warmup": WARM_WARMUP,
            "final": list(FINAL)}  # fmt: skip
    cache = Cache(CACHE / f"{task}.json", head)
    stored = stability.pool_results(pool)
    steps = pool["options"]["max_steps"]
    for seed in seeds:
        spec = pool_spec(task, pool, RMAX, seed)
        ctx = TrialContext.for_spec(spec)
        source = Path(spec.adapter_dir)
        folder = CACHE / "adapters" / task / f"s{seed}"
        t0 = time.perf_counter()
        # the checks: the saved adapter and its SVD at r_max reproduce the trial
        want = stored[(RMAX, seed)].best_val_loss
        for name in ("adapter", "svd"):
            src = (
                source if name == "adapter" else write_truncation(source, folder / f"r{RMAX}", RMAX)
            )
            check = at_rank(spec, RMAX, "check")
            got = cache.get(f"s{seed}/check/{name}", evaluate_adapter, check, ctx, src)
            diff = got["best_val_loss"] - want
            if abs(diff) > CHECK_TOL:
                del cache.data["entries"][f"s{seed}/check/{name}"]  # not kept: rerun checks again
                cache.save()
                raise SystemExit(
                    f"{task} s{seed}: r{RMAX} {name} gives {got['best_val_loss']:.6f}"
                    f", the trial {want:.6f} (diff {diff:.2e} > {CHECK_TOL})"
                )
        for r in RANKS:
            trunc = write_truncation(source, folder / f"r{r}", r)
            plain = at_rank(spec, r, f"trunc-r{r}")
            cache.get(f"s{seed}/trunc/r{r}", evaluate_adapter, plain, ctx, trunc)
            for name, (w, lr) in WARM.items():
                n = max(1, round(w * steps))
                warm = from_truncation(spec, r, f"{name}-r{r}-s{seed}", trunc, n,
                                       warmup_steps=WARM_WARMUP, eval_every=n,
                                       lr=spec.train.lr * lr)  # fmt: skip
                cache.get(f"s{seed}/{name}/r{r}", train_from, warm, ctx)
        if final:
            chosen = {answer(curve(cache.data, pool, v, seed), pool).rank for v in VARIANTS}
            for r in sorted(x for x in chosen if x is not None):
                trunc = write_truncation(source, folder / f"r{r}", r)
                for share in FINAL:
                    n = max(1, round(share * steps))
                    fin = from_truncation(spec, r, f"final{round(share * 100)}-r{r}-s{seed}",
                                          trunc, n)  # fmt: skip
                    cache.get(f"s{seed}/final{round(share * 100)}/r{r}", train_from, fin, ctx)
        log(f"{task} s{seed}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    return cache.data


# -- answers (no torch) --------------------------------------------------------------------
def curve(data: dict, pool: dict, variant: str, seed: int) -> list[TrialResult] | None:
    """The variant's curve on ``seed``: r = 1..16 measured here, r_max the pool's trial."""
    out = []
    for r in data["ranks"]:
        e = data["entries"].get(f"s{seed}/{variant}/r{r}")
        if e is None:
            return None
        out.append(TrialResult(key=f"r{r}-s0", rank=r, seed=0, status="complete",
                               best_val_loss=e["best_val_loss"], val_blocks=list(e["val_blocks"]),
                               train_tokens=e["train_tokens"]))  # fmt: skip
    top = stability.pool_results(pool)[(data["r_max"], seed)]
    return out + [top.replace(seed=0, key=f"r{data['r_max']}-s0")]


def answer(results: list[TrialResult], pool: dict, seeds: int = 1) -> stability.Answer:
    """The default criterion's answer on ``results`` told to a grid (one seed)."""
    by = {(t.rank, t.seed): t for t in results}
    ranks = sorted({t.rank for t in results})
    grid = Grid(ranks=ranks, seeds=seeds, criterion=Criterion(), base_loss=pool["base_loss"])
    asked = []
    while (p := grid.ask()) is not None:
        asked.append(by[(p.rank, p.seed)])
        grid.tell(asked[-1])
    rec = recommend(grid.scores(), Criterion(), grid.stop_reason, pool["base_loss"])
    return stability.Answer(rec.rank, bool(rec.undecided), tuple(asked))


def grid_one_seed(pool: dict, seed: int) -> stability.Answer:
    stored = stability.pool_results(pool)
    return answer([stored[(r, seed)].replace(seed=0, key=f"r{r}-s0") for r in pool["ranks"]], pool)


def seed_sd(pool: dict, r: int) -> float:
    return statistics.stdev(t["best_val_loss"] for t in pool["trials"] if t["rank"] == r)


def rows_of(data: dict, pool: dict) -> list[dict]:
    """Per seed measured: every variant's answer, its tokens and the delivered adapters."""
    stored = stability.pool_results(pool)
    one = stored[(data["r_max"], 0)].train_tokens  # one trial
    grid = stability.replay(pool, "grid, all N seeds", Criterion(), 1)
    ladder = [stability.replay(pool, "new default", Criterion(), o) for o in stability.OUTER]
    seeds = sorted({int(k.split("/")[0][1:]) for k in data["entries"]})
    out = []
    for s in seeds:
        row = {"task": data["task"], "k": data["k"], "seed": s, "grid": grid, "ladder": ladder,
               "grid_seed": grid_one_seed(pool, s), "variants": {}}  # fmt: skip
        for v in VARIANTS:
            c = curve(data, pool, v, s)
            if c is None:
                continue
            a = answer(c, pool)
            warm = sum(t.train_tokens for t in c[:-1])
            finals = {}
            for share in FINAL:
                e = data["entries"].get(f"s{s}/final{round(share * 100)}/r{a.rank}")
                if e is not None:
                    finals[share] = {
                        "loss": e["best_val_loss"], "tokens": e["train_tokens"],
                        "minus_ordinary": e["best_val_loss"] - stored[(a.rank, s)].best_val_loss,
                        "trunc": data["entries"][f"s{s}/trunc/r{a.rank}"]["best_val_loss"]
                        if a.rank != data["r_max"] else stored[(a.rank, s)].best_val_loss,
                    }  # fmt: skip
            main = finals.get(FINAL[0])
            tokens = (one + warm + (main["tokens"] if main else FINAL[0] * one)) / one
            row["variants"][v] = {"answer": a, "tokens": tokens, "finals": finals,
                                  "sd": seed_sd(pool, a.rank) if a.rank else None}  # fmt: skip
        out.append(row)
    return out


# -- tables --------------------------------------------------------------------------------
def mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def curves_table(datas: list[dict], pools: dict) -> str:
    """Per task: the grid's curve (mean ± std over its 6 seeds) and each variant's (mean over
    the seeds measured), and each variant minus the grid trial of the same seed."""
    ranks = RANKS + [RMAX]
    lines = ["| task | curve | " + " | ".join(f"r={r}" for r in ranks) + " |",
             "|---|---|" + "---|" * len(ranks)]  # fmt: skip
    for d in datas:
        pool = pools[d["task"]]
        stored = stability.pool_results(pool)
        seeds = sorted({int(k.split("/")[0][1:]) for k in d["entries"]})
        cells = []
        for r in ranks:
            xs = [stored[(r, s)].best_val_loss for s in range(pool["seeds"])]
            cells.append(f"{mean(xs):.4f} ± {statistics.stdev(xs):.4f}")
        lines.append(f"| {d['task']} (k={d['k']}) | grid, {pool['seeds']} seeds | "
                     + " | ".join(cells) + " |")  # fmt: skip
        xs = [mean(stored[(r, s)].best_val_loss for s in seeds) for r in ranks]
        if seeds != list(range(pool["seeds"])):  # else the row above
            lines.append(f"| | grid, seeds {fmt_seeds(seeds)} | "
                         + " | ".join(f"{x:.4f}" for x in xs) + " |")  # fmt: skip
        for v in VARIANTS:
            vals, diffs = [], []
            for r in ranks:
                got = [d["entries"].get(f"s{s}/{v}/r{r}") if r != RMAX else
                       {"best_val_loss": stored[(r, s)].best_val_loss} for s in seeds]  # fmt: skip
                got = [(s, e["best_val_loss"]) for s, e in zip(seeds, got, strict=True) if e]
                vals.append(mean(x for _, x in got))
                diffs.append(mean(x - stored[(r, s)].best_val_loss for s, x in got))
            lines.append(f"| | {LABEL[v]} | " + " | ".join(
                "-" if x is None else f"{x:.4f} ({dx:+.4f})" for x, dx in zip(vals, diffs, strict=True)
            ) + " |")  # fmt: skip
    return "\n".join(lines) + (
        "\n\n(variant rows: mean over the seeds measured (mean of variant − grid trial of the "
        "same seed); r=32 is the r_max trial itself)"
    )


def fmt_seeds(seeds: list[int]) -> str:
    return (
        f"{seeds[0]}-{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else str(seeds)
    )


def fmt_final(f: dict | None) -> str:
    return "-" if f is None else f"{f['minus_ordinary']:+.4f}"


def answers_table(rows: list[dict]) -> str:
    names = " / ".join(LABEL[v] for v in VARIANTS)
    lines = [
        "| task | k | seed | grid (6 seeds) | grid (this seed) | new default (outer 1-5) | "
        + " | ".join(LABEL[v] for v in VARIANTS)
        + f" | tokens ÷ trial ({names}) | final 50% − ordinary | final 25% − ordinary | "
        "seed std at r |",
        "|---|---|---|---|---|---|" + "---|" * len(VARIANTS) + "---|---|---|---|",
    ]
    for row in rows:
        vs = row["variants"]
        got = [vs.get(v) for v in VARIANTS]
        lab = [g["answer"].label() if g else "-" for g in got]
        tok = " / ".join(f"{g['tokens']:.2f}" if g else "-" for g in got)
        f50 = " / ".join(fmt_final(g["finals"].get(FINAL[0])) if g else "-" for g in got)
        f25 = " / ".join(fmt_final(g["finals"].get(FINAL[1])) if g else "-" for g in got)
        sd = " / ".join(f"{g['sd']:.4f}" if g and g["sd"] is not None else "-" for g in got)
        ladder = " / ".join(a.label() for a in row["ladder"])
        lines.append(
            f"| {row['task']} | {row['k']} | {row['seed']} | {row['grid'].label()} | "
            f"{row['grid_seed'].label()} | {ladder} | "
            + " | ".join(lab)
            + f" | {tok} | {f50} | {f25} | {sd} |"
        )
    return "\n".join(lines) + (
        "\n\n(final and seed-std cells: one per variant, in the order of the variant columns, "
        "at that variant's answer)"
    )


def by_task_table(rows: list[dict]) -> str:
    """Per task: the answers over the seeds measured, beside the grid's and the ladder's."""
    tasks: dict[str, list[dict]] = {}
    for row in rows:
        tasks.setdefault(row["task"], []).append(row)
    lines = [
        "| task | k | grid (6 seeds) | new default (outer seeds 1-5) | grid, one seed | "
        + " | ".join(LABEL[v] for v in VARIANTS) + " |",
        "|---|---|---|---|---|" + "---|" * len(VARIANTS),
    ]  # fmt: skip
    for task, got in tasks.items():
        first = got[0]
        cells = [" ".join(r["variants"][v]["answer"].label() if v in r["variants"] else "-"
                          for r in got) for v in VARIANTS]  # fmt: skip
        lines.append(
            f"| {task} | {first['k']} | {first['grid'].label()} | "
            + " ".join(a.label() for a in first["ladder"]) + " | "
            + " ".join(r["grid_seed"].label() for r in got) + " | " + " | ".join(cells) + " |"
        )  # fmt: skip
    seeds = sorted({r["seed"] for r in rows})
    return "\n".join(lines) + (
        f"\n\n(one-seed cells: seeds {fmt_seeds(seeds)} in order; '?': the noise left the "
        "answer's comparison open)"
    )


def summary_table(rows: list[dict]) -> str:
    """Per variant: how often it gives the grid's answer (all 6 seeds), k, and its tokens;
    the grid on one seed and the new default ladder as references."""
    n = len(rows)
    lines = [
        "| search | = grid (6 seeds) | = k | within 2x of k | undecided | tokens ÷ trial (mean) | "
        "final 50% − ordinary (min / median / max) | final 25% − ordinary (min / median / max) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def spread(xs):
        xs = sorted(xs)
        if not xs:
            return "-"
        return f"{xs[0]:+.4f} / {statistics.median(xs):+.4f} / {xs[-1]:+.4f} (n={len(xs)})"

    def line(name, answers, tokens, f50=(), f25=()):
        m = len(answers)
        lines.append(
            f"| {name} | {sum(a.rank == g for a, g, _ in answers)}/{m} | "
            f"{sum(a.rank == k for a, _, k in answers)}/{m} | "
            f"{sum(stability.within_2x(a.rank, k) for a, _, k in answers)}/{m} | "
            f"{sum(a.undecided for a, _, _ in answers)}/{m} | {mean(tokens):.2f} | "
            f"{spread(f50)} | {spread(f25)} |"
        )

    for v in VARIANTS:
        got = [(r["variants"][v], r["grid"].rank, r["k"]) for r in rows if v in r["variants"]]
        line(LABEL[v], [(g["answer"], grid, k) for g, grid, k in got], [g["tokens"] for g, _, _ in got],
             [g["finals"][FINAL[0]]["minus_ordinary"] for g, _, _ in got if FINAL[0] in g["finals"]],
             [g["finals"][FINAL[1]]["minus_ordinary"] for g, _, _ in got if FINAL[1] in g["finals"]])  # fmt: skip
    line("grid, one seed (the same seeds)", [(r["grid_seed"], r["grid"].rank, r["k"]) for r in rows],
         [6.0 for _ in rows])  # fmt: skip
    tasks = {r["task"]: r for r in rows}.values()  # the ladder: 5 outer seeds per task
    one = {r["task"]: r["grid"].asked[0].train_tokens for r in tasks}
    lad = [(a, r["grid"].rank, r["k"]) for r in tasks for a in r["ladder"]]
    line("new default ladder (outer seeds 1-5)", lad,
         [a.tokens / one[r["task"]] for r in tasks for a in r["ladder"]])  # fmt: skip
    return (
        "\n".join(lines) + f"\n\n({n} task × seed rows; the ladder row counts its 5 outer "
        "seeds per task; '= grid' compares ranks, '?' answers included; tokens count the final "
        f"as {FINAL[0]:g} trial where it was not trained)"
    )


def delivered_table(rows: list[dict]) -> str:
    """Each distinct (task, seed, rank) a final was trained at."""
    lines = [
        "| task | seed | rank | chosen by | truncation | final 25% | final 50% | ordinary "
        "(same seed) | grid mean ± std (6 seeds) | better of final 50% and truncation − "
        "ordinary |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        by: dict[int, list[str]] = {}
        for v, g in row["variants"].items():
            if g["answer"].rank is not None and g["finals"]:
                by.setdefault(g["answer"].rank, []).append(LABEL[v])
        for r, names in sorted(by.items()):
            g = next(g for g in row["variants"].values() if g["answer"].rank == r)
            f = g["finals"]
            ordinary = f[FINAL[0]]["loss"] - f[FINAL[0]]["minus_ordinary"]
            grid = [t.best_val_loss for t in row["grid"].asked if t.rank == r]
            lines.append(
                f"| {row['task']} | {row['seed']} | {r} | {', '.join(names)} | "
                f"{f[FINAL[0]]['trunc']:.4f} | "
                + (f"{f[FINAL[1]]['loss']:.4f}" if FINAL[1] in f else "-")
                + f" | {f[FINAL[0]]['loss']:.4f} | {ordinary:.4f} | "
                f"{mean(grid):.4f} ± {statistics.stdev(grid):.4f} | "
                f"{min(f[FINAL[0]]['loss'], f[FINAL[0]]['trunc']) - ordinary:+.4f} |"
            )
    return "\n".join(lines)


def checks_table(datas: list[dict], pools: dict) -> str:
    worst = {"adapter": 0.0, "svd": 0.0}
    for d in datas:
        stored = stability.pool_results(pools[d["task"]])
        for key, e in d["entries"].items():
            s, kind, *rest = key.split("/")
            if kind == "check":
                diff = abs(e["best_val_loss"] - stored[(d["r_max"], int(s[1:]))].best_val_loss)
                worst[rest[0]] = max(worst[rest[0]], diff)
    return (
        f"Checks (every task × seed): the saved r{RMAX} adapter re-evaluated reproduces the "
        f"trial's best val loss within {worst['adapter']:.1e}; its SVD truncation to "
        f"r={RMAX} within {worst['svd']:.1e} (tolerance {CHECK_TOL:g})."
    )


def report(tasks: list[str]) -> str:
    datas = [json.loads((CACHE / f"{t}.json").read_text()) for t in tasks
             if (CACHE / f"{t}.json").exists()]  # fmt: skip
    if not datas:
        raise SystemExit(f"nothing measured in {CACHE}: run without --report first")
    pools = {d["task"]: stability.load_pool(stability.POOLS / f"{d['task']}.json") for d in datas}
    rows = [row for d in datas for row in rows_of(d, pools[d["task"]])]
    return "\n\n".join([
        checks_table(datas, pools),
        "Curves (best val loss per rank):\n\n" + curves_table(datas, pools),
        "Answers by task (default criterion: knee, 1% of the base model's gap):\n\n"
        + by_task_table(rows),
        "Answers per task and seed:\n\n" + answers_table(rows),
        "Summary:\n\n" + summary_table(rows),
        "Delivered adapters (final trial from the truncation at each chosen rank; best val "
        "loss):\n\n" + delivered_table(rows),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=stability.DEFAULT_TASKS,
                        choices=stability.DEFAULT_TASKS)  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--no-final", action="store_true", help="curves only, no final trials")
    parser.add_argument("--report", action="store_true", help="tables from the saved JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args(argv)
    if not args.report:
        import torch

        torch.set_num_threads(args.threads)
        for task in args.tasks:
            measure_task(task, args.seeds, not args.no_final)
    print(report(args.tasks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
