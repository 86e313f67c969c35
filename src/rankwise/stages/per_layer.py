"""Per-module ranks after the search (``--per-layer``): propose, train, keep what holds.

The search chooses one rank r for every module. This step asks whether the modules need
it alike, with two proposals of a ``rank_pattern``:

- **spectral**: the chosen adapter's spectra (:mod:`rankwise.analysis.spectra`); each module gets
  the fewest directions holding ``--per-layer-energy`` of its update's energy.
- **eva**: PEFT's EVA initialisation (``init_lora_weights="eva"``, Explained Variance
  Adaptation, arXiv 2410.07170): an incremental PCA of each module's input activations on
  the training blocks; the pooled explained-variance ratios fill a budget of Σ ranks, so
  ranks move between modules (a module may get 0). EVA redistributes a budget, it does not
  shrink one: at r it would spend the uniform adapter's budget. It therefore gets the
  spectral pattern's budget (r_eva = that pattern's mean rank) and may give a module up to
  r (rho = r / r_eva), as the spectral pattern may: the two place equal budgets.

Each proposal is an ordinary trial (``TrialKind.PER_LAYER``, group ``per-layer:<name>``)
with the chosen trial's data, steps, seeds, learning rate and LoRA settings. It replaces
the uniform rank when it is as good as the uniform rank (the search's criterion and the
noise, the one judge of ranks, target sets and co-tuning) and it has fewer trainable parameters (PEFT's own count); of
several, the fewest parameters. The recommendation then carries its pattern and the
delivered adapter is its trial's.

Alpha per module: the search's alpha policy applied at each module's own rank
(:func:`module_alpha`), so a module at rank r_i trains as a uniform trial at r_i did on
the rank curve. Under ``fixed`` (scale alpha/r_i) and ``rslora`` (alpha/sqrt(r_i)) the
alpha stays and no ``alpha_pattern`` is needed; under ``ratio`` alpha_i = ratio·r_i. Why
not keep the chosen rank's scale alpha/r in every module (EVA's
``adjust_scaling_factors``)? Under the 1/r scale the best learning rate is nearly
rank-independent ("LoRA Without Regret", 2025), which is why the search's one calibrated
rate serves every rank; a rank-r_i module scaled by alpha/r would train r/r_i times slower
than that rate intends, and the pattern would lose for its step size, not its capacity.
EVA is run with ``adjust_scaling_factors`` set exactly when the policy is ``ratio``,
which makes PEFT's alpha·r_i/r the policy's ratio·r_i.

Example (the pattern of a proposal, alpha by policy):
    >>> from rankwise.records import LoraSpec
    >>> base = LoraSpec(r=8, lora_alpha=16.0, target_modules="all-linear")
    >>> spec = pattern_spec(base, {"a.q_proj": 8, "a.v_proj": 8, "a.up_proj": 1}, "fixed")
    >>> spec.r, spec.rank_pattern, spec.lora_alpha, spec.alpha_pattern
    (8, {'a.up_proj': 1}, 16.0, {})
    >>> spec = pattern_spec(base, {"a.q_proj": 8, "a.up_proj": 1}, "ratio")  # alpha = 2r
    >>> spec.r, spec.rank_pattern, spec.lora_alpha, spec.alpha_pattern
    (1, {'a.q_proj': 8}, 2.0, {'a.q_proj': 16.0})
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rankwise.config import serve_round_up
from rankwise.core.scores import paired_scores, rank_scores
from rankwise.records import TrialKind, TrialResult, Variant
from rankwise.stages.base import Answer, StageContext, StageOutcome
from rankwise.training.patterns import PROPOSALS, eva_spec, pattern_spec


# -- the step after the search ---------------------------------------------------------------
class PerLayer:
    """``--per-layer``: a rank pattern per module, kept when it holds with fewer parameters."""

    name = "per_layer"

    def applies(self, opts, answer: Answer) -> bool:
        return bool(opts.search.per_layer) and answer.rec.rank is not None

    def run(self, ctx: StageContext, answer: Answer) -> StageOutcome:
        return per_layer(ctx.runner, ctx.judge, answer)


def per_layer(runner, judge, answer: Answer) -> StageOutcome:
    """Train the proposals at the chosen rank and compare them with it (``judge(score,
    reference)``: the search's criterion and the noise, paired by seed)."""
    rec, lora, source = answer.rec, answer.lora, answer.source
    s = runner.opts.search
    reference = [t for t in source if t.rank == rec.rank and t.ok]
    ref_score = rank_scores(reference)[0]
    chosen = min(reference, key=lambda t: t.best_val_loss)
    ranks, specs, skipped = _proposals(runner, chosen, rec.rank)
    seeds = sorted({t.seed for t in reference})
    trials = {}
    for name, spec in specs.items():
        lora_fields = tuple(dataclasses.asdict(spec).items())
        variant = Variant(TrialKind.PER_LAYER, f"per-layer:{name}", lora=lora_fields)
        trials[name] = [runner.run(rec.rank, seed, variant) for seed in seeds]
    rows = [_reference_row(rec.rank, ref_score, chosen)]
    for name in PROPOSALS:
        if name in skipped:
            rows.append({"proposal": name, "status": "not trained", "reason": skipped[name]})
        else:
            rows.append(_row(name, trials[name], specs[name], reference, chosen, ranks, judge))
    good = [row for row in rows[1:] if row.get("reaches") and row["params_share"] < 1]
    pick = min(good, key=lambda row: (row["trainable_params"], row["mean"]), default=None)
    verdict = _verdict(rows, pick, s.per_layer_energy)
    section = {
        "energy": s.per_layer_energy,
        "rows": rows,
        "verdict": verdict,
        "pick": pick["proposal"] if pick else "uniform",
        "changed": pick is not None,
    }
    if pick is None:
        return StageOutcome(PerLayer.name, section, answer)
    name = pick["proposal"]
    picked = [t for t in trials[name] if t.ok]
    final = specs[name]
    if name == "eva":  # what EVA chose, as the delivered adapter's own config records it
        eva = min(picked, key=lambda t: t.best_val_loss).extra["eva"]
        final = final.replace(**{k: eva[k] for k in ("rank_pattern", "alpha_pattern")})
        final = final.replace(target_modules=eva["target_modules"])
    lora = runner.lora_config(rec.rank, overrides=tuple(dataclasses.asdict(final).items()))
    rec = dataclasses.replace(
        rec, loss=pick["mean"], reason=f"{rec.reason}; per-layer ranks: {verdict}"
    )
    return StageOutcome(PerLayer.name, section, Answer(rec, lora, picked))


def _proposals(runner, chosen: TrialResult, rank: int):
    """(spectral ranks by module, {proposal: LoraSpec to train}, {proposal: why not trained})."""
    from rankwise.analysis.spectra import inspect_adapter

    s, policy = runner.opts.search, runner.opts.lora.alpha_policy
    ref_lora = runner.store.spec(chosen.key).lora.replace(r=rank)
    spectra = inspect_adapter(runner.dir.trial_adapter(chosen.key), s.per_layer_energy)
    ranks = spectra.proposal().ranks
    if s.serve:  # --serve: each module's rank rounded up to one the server loads
        ranks = {name: serve_round_up(k) for name, k in ranks.items()}
    budget = max(1, round(sum(ranks.values()) / len(ranks)))
    specs, skipped = {}, {}
    if all(k == rank for k in ranks.values()):
        skipped["spectral"] = f"the spectra ask for r={rank} in every module"
    else:
        specs["spectral"] = pattern_spec(ref_lora, ranks, policy)
    if budget >= rank:  # every module may hold at most r: EVA would give each exactly r
        skipped["eva"] = f"at a budget of r={budget} per module EVA cannot move ranks"
    elif s.serve:
        skipped["eva"] = f"EVA picks any rank per module; --serve {s.serve} loads only its set"
    elif ref_lora.target_parameters:
        skipped["eva"] = "EVA initialises modules, not --target-parameters (PEFT)"
    else:
        specs["eva"] = eva_spec(ref_lora, budget, policy)
    return ranks, specs, skipped


def _by_type(ranks: dict[str, int], names: list[str]) -> dict[str, float]:
    """Mean rank per module type (q_proj, up_proj, ...) over ``names``; absent = rank 0."""
    from rankwise.analysis.spectra import module_kinds

    cells: dict[str, list[int]] = {}
    for name, (kind, _) in module_kinds(names).items():
        cells.setdefault(kind, []).append(ranks.get(name, 0))
    return {kind: sum(v) / len(v) for kind, v in cells.items()}


def _reference_row(rank: int, score, chosen: TrialResult) -> dict[str, Any]:
    return {
        "proposal": "uniform",
        "lora_r": rank,
        "trainable_params": chosen.trainable_params,
        "params_share": 1.0,
        "mean": score.mean,
        "se": score.se,
        "n": score.n,
        "train_tokens": chosen.train_tokens,
        "key": chosen.key,
    }


def _row(name, trials, spec, reference, chosen, spectral_ranks, judge) -> dict[str, Any]:
    """One proposal's trials as a row: its pattern, parameters, loss and the verdict."""
    ok = [t for t in trials if t.ok]
    row: dict[str, Any] = {"proposal": name, "lora_r": spec.r, "key": trials[0].key}
    if name == "eva":
        row["eva_config"] = spec.eva_config
    if not ok:
        row.update(status=trials[0].status, reason=trials[0].reason, reaches=False)
        row.update(trainable_params=None, params_share=None, mean=None)
        return row
    best = min(ok, key=lambda t: t.best_val_loss)
    ranks = best.extra["eva"]["ranks"] if name == "eva" else spectral_ranks
    if name == "eva":
        row.update({k: best.extra["eva"][k] for k in ("rank_pattern", "alpha_pattern")})
    else:
        row.update(rank_pattern=spec.rank_pattern, alpha_pattern=spec.alpha_pattern)
    # Paired by seed with the uniform rank: the proposal trains the same seeds.
    pair = paired_scores({"uniform": reference, "proposal": ok})
    score, ref_score = pair["proposal"], pair["uniform"]
    row.update(
        status=best.status,
        ranks=ranks,
        ranks_by_type=_by_type(ranks, list(spectral_ranks)),
        trainable_params=best.trainable_params,
        params_share=best.trainable_params / chosen.trainable_params,
        mean=score.mean,
        se=score.se,
        n=score.n,
        train_tokens=best.train_tokens,
        change=(score.mean - ref_score.mean) / abs(ref_score.mean),
        reaches=judge(score, ref_score),
    )
    return row


def _words(row: dict[str, Any], uniform: dict[str, Any]) -> str:
    if row.get("mean") is None:
        why = row.get("reason") or "no result"
        name = {"spectral": "spectral pattern", "eva": "EVA"}[row["proposal"]]
        return f"{name}: {row['status']} ({why})"
    head = (
        "spectral pattern" if row["proposal"] == "spectral" else f"EVA (budget r={row['lora_r']})"
    )
    types = ", ".join(f"{k} {v:.3g}" for k, v in row["ranks_by_type"].items())
    if row["change"] <= 0:
        held = "below"
    elif row["reaches"]:
        held = f"as good as (by the criterion{' or the noise' if row['n'] > 1 else ''})"
    else:
        held = "does not reach"
    return (
        f"{head} (mean rank by type: {types}): val loss {row['mean']:.4f} "
        f"({row['change']:+.1%}, {held} r={uniform['lora_r']}) with "
        f"{row['trainable_params']:,} trainable params ({row['params_share']:.0%} of "
        f"{uniform['trainable_params']:,})"
    )


def _verdict(rows: list[dict], pick: dict | None, energy: float) -> str:
    uniform = rows[0]
    parts = [_words(row, uniform) for row in rows[1:]]
    if pick is None:
        head = (
            f"the uniform r={uniform['lora_r']} stays (val loss {uniform['mean']:.4f}): no "
            "proposal reaches it with fewer parameters"
        )
    else:
        saved = 1 - pick["params_share"]
        name = "the spectral pattern" if pick["proposal"] == "spectral" else "EVA's pattern"
        # The delivered adapter's own score first: "as good as" may be within the noise.
        head = (
            f"{name} scores val loss {pick['mean']:.4f} against r={uniform['lora_r']}'s "
            f"{uniform['mean']:.4f} ({pick['mean'] - uniform['mean']:+.4f}, as good by the "
            f"criterion and the noise) with {saved:.0%} fewer trainable parameters; "
            "it is recommended and delivered"
        )
    return f"{head} ({'; '.join(parts)}; spectral energy {energy:g})"
