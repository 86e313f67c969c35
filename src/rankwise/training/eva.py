"""EVA initialisation of a trial (``init_lora_weights="eva"``) and the LoraSpec of a rank pattern."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch

from rankwise.records import LoraSpec, TrainSpec, TrialResult
from rankwise.training.adapter import TrialContext
from rankwise.training.hooks import Hooks, Run, trial_result

PROPOSALS = ("spectral", "eva")


# PEFT's default: a module's PCA stops once its components' cosine similarity between two
# batches is at least this (EvaConfig.tau).
EVA_TAU = 0.99


# get_peft_model says so for every EVA adapter; rankwise attaches to a loaded model.
warnings.filterwarnings("ignore", message="lora with eva initialization used with low_cpu_mem")


def module_alpha(policy: str, reference: LoraSpec, rank: int) -> float:
    """``lora_alpha`` of a module at ``rank`` under the alpha policy (see the module doc).

    >>> ref = LoraSpec(r=16, lora_alpha=32.0)
    >>> module_alpha("fixed", ref, 4), module_alpha("rslora", ref, 4), module_alpha("ratio", ref, 4)
    (32.0, 32.0, 8.0)
    """
    if policy == "ratio":
        return reference.lora_alpha * rank / reference.r
    return reference.lora_alpha


def pattern_spec(reference: LoraSpec, ranks: dict[str, int], policy: str) -> LoraSpec:
    """``reference`` with every module at its rank in ``ranks``: ``r`` is the most common
    rank (on a tie the smaller), the others go to ``rank_pattern``; alpha by the policy."""
    counts = Counter(ranks.values())
    r = max(counts, key=lambda k: (counts[k], -k))
    rank_pattern = {name: k for name, k in ranks.items() if k != r}
    alpha = module_alpha(policy, reference, r)
    alpha_pattern = {
        name: a
        for name, k in rank_pattern.items()
        if (a := module_alpha(policy, reference, k)) != alpha
    }
    return reference.replace(
        r=r,
        lora_alpha=alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=True,
        eva_config=None,
    )


def eva_spec(reference: LoraSpec, budget_rank: int, policy: str) -> LoraSpec:
    """EVA at a budget of ``budget_rank`` per module, any module up to ``reference.r``.

    >>> eva_spec(LoraSpec(r=32, lora_alpha=8.0), 4, "fixed").eva_config
    {'rho': 8.0, 'tau': 0.99, 'adjust_scaling_factors': False}
    """
    return reference.replace(
        r=budget_rank,
        lora_alpha=module_alpha(policy, reference, budget_rank),
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights="eva",
        eva_config={
            "rho": max(1.0, reference.r / budget_rank),
            "tau": EVA_TAU,
            "adjust_scaling_factors": policy == "ratio",
        },
    )


# -- EVA inside the trial lifecycle ------------------------------------------------------------
def eva_batches(data, train: TrainSpec) -> list[dict[str, torch.Tensor]]:
    """One epoch of the training blocks in a seeded order, as EVA's dataloader.

    Labels go along: EVA (``use_label_mask``) takes the activations at loss tokens only. A
    last, shorter batch is dropped (EVA skips a batch with fewer tokens than components).
    """
    n = data.train_ids.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(train.seed))
    chunks = list(order.split(train.batch_size))
    if len(chunks) > 1 and len(chunks[-1]) < train.batch_size:
        chunks.pop()
    return [{"input_ids": data.train_ids[i], "labels": data.train_labels[i]} for i in chunks]


def _forward(model, batch: dict[str, torch.Tensor]):
    return model(input_ids=batch["input_ids"])  # no labels: EVA needs activations, not a loss


class EvaInit(Hooks):
    """A plain trial whose adapter is initialised by EVA once attached; records what EVA chose.

    ``trial.run_trial`` uses it for a spec with ``init_lora_weights="eva"``, so such a
    spec alone says how its trial runs. EVA writes the redistributed ranks into the
    adapter's config (``rank_pattern``, ``alpha_pattern``, and ``target_modules`` without
    the modules it gave rank 0); they are read back and verified like any pattern.
    """

    def __init__(self, ctx: TrialContext):
        self.ctx = ctx
        self.chosen: dict[str, Any] = {}

    def attached(self, peft_model, run: Run) -> None:
        from peft import initialize_lora_eva_weights

        from rankwise.analysis.patterns import verify_ranks

        batches = eva_batches(self.ctx.data, run.spec.train)
        initialize_lora_eva_weights(
            peft_model, batches, forward_fn=_forward, show_progress_bar=False
        )
        config = peft_model.peft_config["default"]
        targets = config.target_modules
        self.chosen = {
            "r": config.r,
            "rank_pattern": dict(config.rank_pattern),
            "alpha_pattern": dict(config.alpha_pattern),
            "target_modules": sorted(targets) if isinstance(targets, list | set) else targets,
            "ranks": verify_ranks(peft_model, config),
        }

    def results(self, run: Run) -> list[TrialResult]:
        return [trial_result(run, extra={"eva": self.chosen} if self.chosen else {})]
