"""Benchmarks of rankwise and the task generators they share (not timed tests).

Each module is a script run from the checkout's root, e.g. ``python -m bench.planted --k 2``;
the results are in ``bench/RESULTS.md``. The generators (:mod:`bench.planted`,
:mod:`bench.planted2`, :mod:`bench.corpora`) are imported by the other benchmarks and by the
tests as ``from bench import planted``.
"""
