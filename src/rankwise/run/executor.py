"""Where trials run: one at a time in this process, or side by side on Ray workers.

The search stays in the driver (this process): it asks the strategy, submits trials,
and writes each result to the store the moment it arrives. An executor only decides
where a trial trains:

- :class:`LocalExecutor` (``--executor local``, the default): in this process, one after
  another, exactly as the search has always run.
- :class:`RayExecutor` (``--executor ray``): on long-lived Ray actors, one per worker slot,
  each loading the base model once (:meth:`~rankwise.training.lifecycle.TrialContext.for_spec`) and
  training every trial it is sent. Specs go in and results come out as JSON: nothing that
  does not pickle (a model, a tokenizer) crosses the wire.

Parallel search (:func:`drive_parallel`, torch-free, usable with any :class:`Pool`): the
trial the strategy asks for is run first; free workers run the trials it *may* ask for
next (:func:`lookahead`). Results are told to the strategy in the order a sequential
search would ask for them, so it decides exactly as the sequential search does; trials it
never asks for stay in the store with ``extra["speculative"] = True`` and never change
the answer.

Token blocks: a local Ray (started by the search, or one this process already joined)
shares the file system, so workers read ``DIR/data/tokens.safetensors``; with
``--ray-address`` the nodes may not share it, so the driver puts the blocks in Ray's object
store once, each worker writes them to a local temporary folder on its first trial, and
each trial's adapter files come back with its result and are written under ``DIR/trials``.

Example (a parallel grid over a fake pool: two trials at a time, told in order):
    >>> from rankwise.core.strategies import Grid
    >>> from rankwise.run.parallel import drive_parallel
    >>> from rankwise.testing import FakePool, FakeRunner
    >>> pool = FakePool(slots=2, loss=lambda spec: 1.0 / spec.rank)
    >>> grid = drive_parallel(Grid(ranks=[1, 2, 4, 8]), FakeRunner(), pool=pool)
    >>> [r.rank for r in grid.results], pool.peak
    ([1, 2, 4, 8], 2)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rankwise.config import ExecutorConfig
from rankwise.run.parallel import needed


def make_executor(cfg: ExecutorConfig, run_dir: Path, progress):
    """The executor ``--executor`` names (Ray: imported and connected now, so a missing
    package or an unreachable cluster is refused before the model is loaded)."""
    if cfg.executor == "local":
        return LocalExecutor()
    from rankwise.run.ray_executor import RayExecutor

    return RayExecutor(cfg, run_dir, progress)


# -- the local executor: today's sequential search ------------------------------------------
class LocalExecutor:
    """Every trial in this process, one after another."""

    execute = None  # the runner trains in-process
    resident_bytes = None  # and measures this process's memory before each trial

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def drive(self, strategy, runner, variant, on_result: Callable[[], None] | None = None):
        """Ask/run/tell until the strategy is done."""
        while (p := strategy.ask()) is not None:
            cutoff = runner.cutoff_for(strategy, p, variant)  # --stop-when-decided
            for result in runner.run_proposal(p, variant, cutoff):
                strategy.tell(needed(runner, result))
            if on_result:
                on_result()
        return strategy

    def nested(self, spec, ctx, progress=None):
        from rankwise.training.nested import run_nested

        return run_nested(spec, ctx, progress)
