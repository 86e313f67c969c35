"""NEFTune (Jain et al., arXiv 2310.05914) on a trial: noise on the input embeddings while it
trains, exactly as transformers' Trainer adds it for ``neftune_noise_alpha``.

transformers' own forward hook does the work (``transformers.integrations.neftune``): on
the embedding layer's output, in training mode only, uniform noise in ``±alpha /
sqrt(seq_len * hidden)``. Evaluation runs the model in eval mode, so no validation loss
is ever measured on noised embeddings. The hook and the attribute it reads are removed
when the trial ends, however it ends, so the base model carries nothing of it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["neftune"]


@contextmanager
def neftune(peft_model, alpha: float | None) -> Iterator[None]:
    """NEFTune with ``alpha`` on ``peft_model``'s input embeddings for the block (None: off)."""
    if alpha is None:
        yield
        return
    from transformers.integrations.neftune import activate_neftune, deactivate_neftune

    handle = activate_neftune(peft_model, alpha)
    try:
        yield
    finally:
        deactivate_neftune(peft_model, handle)
