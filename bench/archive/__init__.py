"""Benchmarks whose decision is taken (each section of ``bench/RESULTS.md`` says what was
decided and names the script here). Kept runnable as ``python -m bench.archive.<name>``, as
they were when the decision was made; not maintained beyond their tests."""
