"""EVA initialisation of a trial (``init_lora_weights="eva"``) and the LoraSpec of a rank pattern."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from rankwise.records import TrainSpec, TrialResult
from rankwise.training.adapter import TrialContext
from rankwise.training.hooks import Hooks, Run, trial_result

# get_peft_model says so for every EVA adapter; rankwise attaches to a loaded model.
warnings.filterwarnings("ignore", message="lora with eva initialization used with low_cpu_mem")


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

        from rankwise.training.patterns import verify_ranks

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
