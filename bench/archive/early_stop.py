"""Stopping a trial once it cannot change the answer: replayed on the stability pools.

Issue "Search cost, second attempt", lever 1. A trial at (rank a, seed s) shares its data
order and validation blocks with every finished trial of seed s, so at each evaluation its
*paired gap* to such a partner (rank b, seed s) is known: g(t) = loss_a(t) - loss_b(t). If
the gap kept its value to the end, the trial would finish at P* + g(t) (P*: the partner's
final loss). The rule stops the trial at step t when the search's next decision (the
recommended rank, whether it is undecided, and the next trial asked for) is the same for
every final loss in ``P* + g(t) +- m(t)`` (:data:`POINTS` of them, evenly spread); the search is then told the prediction, and the
tokens after t are saved.

``m(t)`` is how far a paired gap still moved between step t and the end, measured on the
*other* pools (leave one task out): the largest ``|g(T) - g(t)|`` over every pair of ranks and
seeds at the same fraction t/T of training, times ``--scale``. Trials stop only from
``--min-fraction`` of the steps on.

Measured per task and outer seed (the stability replay's order of seeds): the answer with and
without stopping, the tokens against the one-seed search, how many trials stopped, and how
many stops changed the search's final answer (the rule must be one whose error is 0).

Usage::

    .venv/bin/python -m bench.archive.early_stop                    # the table (no torch, ~1 min)
    .venv/bin/python -m bench.archive.early_stop --scale 2 --min-fraction 0.6
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from bench import stability as S
from rankwise.core.criteria import Criterion, recommend
from rankwise.core.cutoff import Cutoff

POINTS = 21  # final losses tried across the band, its ends and its middle included


def drift_bounds(pool: dict) -> dict[float, float]:
    """Per fraction of training t/T: the largest |g(T) - g(t)| over the pool's rank pairs."""
    curves = {(t["rank"], t["seed"]): dict(map(tuple, t["val_curve"])) for t in pool["trials"]}
    out: dict[float, float] = {}
    ranks = sorted(pool["ranks"])
    for i, a in enumerate(ranks):
        for b in ranks[i + 1 :]:
            for s in range(pool["seeds"]):
                A, B = curves[(a, s)], curves[(b, s)]
                end = max(A)
                for t in sorted(A)[:-1]:
                    f = round(t / end, 2)
                    moved = abs((A[end] - B[end]) - (A[t] - B[t]))
                    out[f] = max(out.get(f, 0.0), moved)
    return out


def _decision(strategy, result) -> tuple:
    s = copy.deepcopy(strategy)
    s.tell(result)
    rec = recommend(s.scores(), s.criterion, s.stop_reason, s.base_loss)
    p = s.ask()
    return rec.rank, bool(rec.undecided), None if p is None else (p.rank, p.seed)


def replay_stopping(pool, outer, criterion, bound, min_fraction) -> tuple:
    """The new default's ladder with the stop rule: (answer, tokens, stops)."""
    trials, perm = S.pool_results(pool), S.permutation(outer, pool["seeds"])
    ranks = sorted(pool["ranks"])
    strategy = S.new_default(ranks, criterion, pool["base_loss"])
    done, tokens, stops = {}, 0.0, 0
    while (p := strategy.ask()) is not None:
        full = trials[(p.rank, perm[p.seed])].replace(seed=p.seed, key=f"r{p.rank}-s{p.seed}")
        told, fraction = full, 1.0
        partners = [r for (r, s) in done if s == p.seed and r != p.rank]
        if partners:
            partner = done[(min(partners, key=lambda r: abs(r - p.rank)), p.seed)]
            mine, theirs = dict(full.val_curve), dict(partner.val_curve)
            end = max(mine)
            for t in sorted(mine)[:-1]:
                f = round(t / end, 2)
                if f < min_fraction or t not in theirs:
                    continue
                guess = partner.best_val_loss + mine[t] - theirs[t]
                band = [guess + bound[f] * (i / (POINTS // 2) - 1) for i in range(POINTS)]
                seen = {_decision(strategy, full.replace(best_val_loss=x, val_blocks=[]))
                        for x in band}  # fmt: skip
                if len(seen) == 1:
                    told, fraction = full.replace(best_val_loss=guess, val_blocks=[]), f
                    stops += 1
                    break
        tokens += full.train_tokens * fraction
        done[(p.rank, p.seed)] = told
        strategy.tell(told)
    rec = recommend(strategy.scores(), criterion, strategy.stop_reason, pool["base_loss"])
    return rec.rank, tokens, stops


def replay_product(pool, outer, criterion, drift) -> tuple:
    """The new default's ladder with rankwise's own rule (``--stop-when-decided``,
    :class:`rankwise.core.cutoff.Cutoff`) and the band table ``drift`` measured on the other
    pools: (answer, undecided, tokens, stops). The pools keep per-block losses only at a
    trial's best, so a stopped trial's blocks at step t are those moved by its loss at t."""
    trials, perm = S.pool_results(pool), S.permutation(outer, pool["seeds"])
    strategy = S.new_default(sorted(pool["ranks"]), criterion, pool["base_loss"])
    tokens, stops = 0.0, 0
    while (p := strategy.ask()) is not None:
        full = trials[(p.rank, perm[p.seed])].replace(seed=p.seed, key=f"r{p.rank}-s{p.seed}")
        told, fraction = full, 1.0
        cut = Cutoff.for_proposal(strategy, p, strategy.results, drift)
        curve = dict(full.val_curve)
        end = max(curve)
        for t in sorted(curve)[:-1] if cut else []:
            moved = [b + curve[t] - full.best_val_loss for b in full.val_blocks]
            if (verdict := cut(t, end, curve[t], moved)) is not None:
                told, fraction = verdict.apply(full), t / end
                stops += 1
                break
        tokens += full.train_tokens * fraction
        strategy.tell(told)
    rec = recommend(strategy.scores(), criterion, strategy.stop_reason, pool["base_loss"])
    return rec.rank, bool(rec.undecided), tokens, stops


def product_table(pools: list[dict], criterion: Criterion) -> str:
    """rankwise's ``--stop-when-decided`` replayed, its band measured leave-one-task-out."""

    def run(pool, outer, bound):
        drift = tuple((f, bound.get(f, 0.0)) for f in (0.4, 0.6, 0.8))
        rank, undecided, tokens, stops = replay_product(pool, outer, criterion, drift)
        return rank, f"{rank}{'?' if undecided else ''}", tokens, stops

    return _table(pools, criterion, run, "--stop-when-decided", 1.0)


def table(pools: list[dict], criterion: Criterion, scale: float, min_fraction: float) -> str:
    """The replay's first rule (:func:`replay_stopping`), its band ``scale`` x the drift."""

    def run(pool, outer, bound):
        rank, tokens, stops = replay_stopping(pool, outer, criterion, bound, min_fraction)
        return rank, str(rank), tokens, stops

    return _table(pools, criterion, run, "stopping", scale)


def _table(pools, criterion, run, name: str, scale: float) -> str:
    """Per task: the answers without and with stopping (``run(pool, outer, bound)`` ->
    (rank, label, tokens, stops)), how many changed, the trials stopped, the tokens."""
    bounds = {p["task"]: drift_bounds(p) for p in pools}
    lines = [
        f"| task | k | answers, no stopping | answers, {name} | answers changed | trials "
        "stopped | tokens vs one seed (no stopping -> stopping) |",
        "|---|---|---|---|---|---|---|",
    ]
    for pool in pools:
        others = [b for t, b in bounds.items() if t != pool["task"]]
        bound = {f: scale * max(b.get(f, 0.0) for b in others) for f in bounds[pool["task"]]}
        plain = [S.replay(pool, "new default", criterion, o) for o in S.OUTER]
        one = sum(S.replay(pool, S.BASELINE, Criterion(), o).tokens for o in S.OUTER)
        got = [run(pool, o, bound) for o in S.OUTER]
        changed = sum(a.rank != b[0] for a, b in zip(plain, got, strict=True))
        lines.append(
            f"| {pool['task']} | {pool['k']} | {' / '.join(a.label() for a in plain)} | "
            f"{' / '.join(b[1] for b in got)} | {changed}/{len(plain)} | "
            f"{sum(b[3] for b in got)} | {sum(a.tokens for a in plain) / one:.2f}x -> "
            f"{sum(b[2] for b in got) / one:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", type=Path, default=S.POOLS)
    parser.add_argument("--scale", type=float, nargs="+", default=[1.0, 2.0])
    parser.add_argument("--min-fraction", type=float, nargs="+", default=[0.4, 0.6])
    parser.add_argument("--product-only", action="store_true",
                        help="only the table of rankwise's own rule")  # fmt: skip
    args = parser.parse_args(argv)
    pools = [S.load_pool(args.pools / f"{t}.json") for t in S.DEFAULT_TASKS]
    print("\nrankwise's rule (--stop-when-decided), band from the other pools:\n")
    print(product_table(pools, Criterion()))
    if args.product_only:
        return 0
    for scale in args.scale:
        for fraction in args.min_fraction:
            print(f"\nm(t) = {scale:g} x the largest drift on the other pools, from "
                  f"{fraction:.0%} of the steps:\n")  # fmt: skip
            print(table(pools, Criterion(), scale, fraction))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
