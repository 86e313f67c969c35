"""Data preparation at scale: time and peak memory of ``prepare_data`` on generated records.

The data: ``--records`` JSON Lines records ``{"text": ...}`` of about 100 characters (words
drawn from a fixed list with a fixed seed), tokenised by rankwise's test tokenizer
(``rankwise.testing.make_tokenizer``: one token per character, so about 100 tokens a
record), packed into 256-token blocks with a 10% validation split.

Each measurement runs in a fresh Python process that imports torch, transformers, datasets
and rankwise, notes its resident memory (the baseline), then times one ``prepare_data``
call (``save_tokens`` is not included: it is the same in both): wall time, and CPU time
(user + system, of the process and its workers; on a shared machine it moves less with
other people's load than wall time does). Peak memory is reported
two ways: the process's own high-water mark (``ru_maxrss``), and, while datasets' worker
processes run, the peak of the summed memory of the process and its workers, sampled every
250 ms (proportional set size, so pages the workers share with the parent count once).

- **before**: ``prepare_data`` as of commit 9887486 (loaded with ``git show``): every
  record read into a list of dicts, rendered into Python lists of token ids, flattened
  and packed.
- **after**: today's ``prepare_data``: streamed through Arrow files and
  ``datasets.map`` (``--num-proc``: worker processes; 1 = tokenise in the main process).

Both must produce the same token blocks; the table says whether they did (a digest of
the blocks). The smoke run needs no git history: it compares today's arm with the "before"
arm's output on the same 3,000 records, measured once at commit 9887486's code and
committed as ``data_prep.reference.json`` (``--write-reference``, which does need that
commit, wrote it). The full run's "before" arm still loads the old code from git; without
the commit it measures "after" only.

Usage::

    .venv/bin/python -m bench.archive.data_prep          # 1,000,000 records; a few minutes each
    .venv/bin/python -m bench.archive.data_prep --smoke  # 3,000 records against the reference
    .venv/bin/python -m bench.archive.data_prep --write-reference   # once, at commit 9887486's code
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout (this file is in bench/archive/)
if not __package__:  # run as a file (the measured child process): make `bench` importable
    sys.path.insert(0, str(ROOT))

from bench import harness  # noqa: E402

BEFORE = "9887486"
SMOKE_RECORDS = 3_000
REFERENCE = Path(__file__).with_name("data_prep.reference.json")
"""The "before" arm on the smoke records (--write-reference): no git history needed."""
HEADER = ["implementation", "records", "tokens (blocks)", "time", "CPU time", "baseline RSS",
          "peak RSS, main process", "peak PSS, all processes", "blocks digest"]  # fmt: skip
WORDS = "the of a to in rank adapter loss model token value layer step data search".split()


def write_records(path: Path, n: int, seed: int = 0) -> int:
    """``n`` JSON Lines records of ~100 characters; returns the file size in bytes."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            words, size = [], 0
            while size < 100:
                words.append(rng.choice(WORDS))
                size += len(words[-1]) + 1
            f.write(json.dumps({"text": " ".join(words)}) + "\n")
    return path.stat().st_size


# -- the measured process -----------------------------------------------------------------------
def old_prepare(commit: str):
    """``prepare_data`` of an earlier commit, run against today's config module."""
    import types

    src = subprocess.run(
        ["git", "show", f"{commit}:src/rankwise/data.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mod = types.ModuleType(f"rankwise._data_{commit}")
    mod.__package__ = "rankwise"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"data.py@{commit}", "exec"), mod.__dict__)
    return mod.prepare_data


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (the workers)."""
    import resource

    return sum(
        u.ru_utime + u.ru_stime
        for u in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )


def child(args) -> None:
    import hashlib
    import resource

    import datasets  # noqa: F401  (imported by both arms: the same baseline)
    import psutil
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from rankwise.config import DataConfig
    from rankwise.io.data import prepare_data
    from rankwise.testing import make_tokenizer

    prepare = old_prepare(BEFORE) if args.impl == "before" else prepare_data
    tokenizer = make_tokenizer()
    cfg = DataConfig(train=args.data, seq_len=args.seq_len, num_proc=args.num_proc)
    baseline = psutil.Process().memory_info().rss
    start, cpu0 = time.perf_counter(), _cpu_seconds()
    data = prepare(cfg, tokenizer, Path(args.data).parent / "no-run", 0)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before hashing
    h = hashlib.sha256()
    for t in (data.train_ids, data.train_labels, data.val_ids, data.val_labels):
        h.update(t.numpy().data)  # the buffer itself: .tobytes() would copy 0.7 GiB
    print(
        "RESULT "
        + json.dumps(
            {
                "seconds": seconds,
                "cpu": cpu,
                "baseline": baseline,
                "maxrss": maxrss,
                "tokens": int(data.train_ids.numel() + data.val_ids.numel()),
                "blocks": int(data.train_ids.shape[0] + data.val_ids.shape[0]),
                "digest": h.hexdigest()[:12],
            }
        ),
        flush=True,
    )


# -- the driver -----------------------------------------------------------------------------
def measure(impl: str, data: Path, seq_len: int, num_proc: int | None) -> dict:
    """Run one arm in a fresh process; sample the summed RSS of its process tree."""
    import psutil

    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--child", "--impl", impl, "--data", str(data)]
    cmd += ["--seq-len", str(seq_len)] + (["--num-proc", str(num_proc)] if num_proc else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, p = None, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:  # only while there are workers: alone, the process's ru_maxrss is exact
            if children := p.children(recursive=True):
                peak = max(peak or 0, sum(_pss(q) for q in [p, *children]))
        except (psutil.Error, OSError):
            pass
        time.sleep(0.25)
    out, err = proc.communicate()
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise SystemExit(f"{impl} failed ({proc.returncode}):\n{err[-3000:]}")
    return {**json.loads(line[len("RESULT ") :]), "tree_peak": peak}


def _pss(proc) -> int:
    """Proportional set size: a page shared by k processes counts 1/k in each (forked
    workers share the parent's torch and transformers pages; RSS would count them twice)."""
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as f:
            return next(int(x.split()[1]) * 1024 for x in f if x.startswith("Pss:"))
    except FileNotFoundError:  # not Linux: resident set size
        return proc.memory_info().rss


def _git_has(commit: str) -> bool:
    cmd = ["git", "cat-file", "-e", f"{commit}^{{commit}}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True).returncode == 0


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def arm_name(impl: str, procs: str) -> str:
    if impl == "before":
        return f"before ({BEFORE})"
    return "after" + (f", num_proc {procs}" if procs else ", num_proc auto")


def cells(r: dict) -> list:
    """One row of the table, from one arm's result."""
    peak = mib(r["tree_peak"]) if r.get("tree_peak") else "no workers"
    return [r["implementation"], f"{r['records']:,}", f"{r['tokens']:,} ({r['blocks']:,})",
            f"{r['seconds']:.1f} s", f"{r['cpu']:.1f} s", mib(r["baseline"]), mib(r["maxrss"]),
            peak, r["digest"]]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--arms", default="before,after:1,after", help="before, after[:num_proc]")
    p.add_argument("--smoke", action="store_true", help="3,000 records against the reference")
    p.add_argument("--write-reference", action="store_true", help=f"write {REFERENCE.name}")
    p.add_argument("--results", type=Path, help="folder of data_prep.json (--smoke: none)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--num-proc", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    small = args.smoke or args.write_reference
    n = SMOKE_RECORDS if small else args.records
    arms = ("before" if args.write_reference else "after" if args.smoke else args.arms).split(",")
    if "before" in arms and not _git_has(BEFORE):
        if args.write_reference:
            raise SystemExit(f"--write-reference: commit {BEFORE} is not in this checkout")
        print(f"(commit {BEFORE} is not in this checkout: measuring 'after' only)")
        arms = [a for a in arms if a != "before"]
    rows = []
    if args.smoke:  # the old code's output, committed: the arm the smoke run compares with
        rows.append(json.loads(REFERENCE.read_text()))
    with tempfile.TemporaryDirectory(prefix="rankwise-bench-") as tmp:
        data = Path(tmp) / "records.jsonl"
        size = write_records(data, n)
        print(f"{n:,} records, {size / 2**20:,.1f} MiB of JSON Lines; seq_len {args.seq_len}\n")
        for arm in arms:
            impl, _, procs = arm.partition(":")
            r = measure(impl, data, args.seq_len, int(procs) if procs else None)
            rows.append({"implementation": arm_name(impl, procs), "records": n, **r})
            print(f"measured {rows[-1]['implementation']}", file=sys.stderr, flush=True)
    if args.write_reference:
        ref = {**rows[0], "implementation": f"before ({BEFORE}, committed reference)"}
        REFERENCE.write_text(json.dumps(ref, indent=1) + "\n")
        print(f"wrote {REFERENCE}")
    settings = {"records": n, "seq_len": args.seq_len, "arms": arms}
    if args.results or not small:
        print(f"wrote {harness.write_results('data_prep', rows, args.results, settings)}\n")
    print(harness.table(HEADER, [cells(r) for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
