"""The defaults of the options, in one torch-free place: the CLI's ``--help`` shows them, the library uses them."""

from __future__ import annotations

from mpaudit.arms import DEFAULT_ARMS

DEFAULT_TRACE_EVERY = 50
"""Trace step 0 and every 50th step after it. On ``benchmarks/trace_overhead.py``'s MLP a traced step
costs about 1.15x an untraced one (idle 2-core CPU), so tracing one step in 50 costs
under 1% of a run. A tiny model pays a fixed ~0.1 ms per traced tensor (kernel launches), several of its
own steps per traced step: a 3-layer MLP with 0.2 ms steps spends ~20% more time (a millisecond per 50
steps), which is the price of seeing its numerics at all."""

DEFAULT_BENCH_SECONDS = 10.0
"""Time budget of the timed rounds (warm-up and compilation come on top)."""

DEFAULT_STEPS = 200
"""Optimizer steps per arm when neither ``steps`` nor ``epochs`` is given: under a minute for a small model on a CPU."""

DEFAULT_DIST_TIMEOUT_S = 300.0
"""Process-group timeout: how long a collective may wait for a rank that neither answers nor fails."""

DEFAULT_NOISE_K = 3.0
"""``--max-drop METRIC=auto`` allows a drop of k standard deviations of fp32's seed-to-seed spread. Three
sigma keeps the false-alarm rate of a clean model low even with few seeds, where σ itself is uncertain."""

DEFAULT_VERIFY_BUDGET = 4
"""Extra training runs ``--verify`` may spend by default: enough for a loss scale plus a two-layer
keep-list and one pruning try on a typical finding, small enough to stay a fraction of the audit."""

DEFAULT_SPEEDUP_TOLERANCE = 0.10
"""A benchmark speedup regresses when it shrinks by more than this fraction of the base ratio *and* the two
confidence intervals do not overlap, so timing noise on a busy machine alone never fails CI."""

DEFAULT_MEMORY_TOLERANCE = 0.05
"""A mixed-precision arm's peak memory, as a fraction of fp32's peak in the same result, may grow by this
much (0.05: five percent of fp32's peak) before it counts as a regression."""

__all__ = ["DEFAULT_ARMS", "DEFAULT_BENCH_SECONDS", "DEFAULT_DIST_TIMEOUT_S", "DEFAULT_MEMORY_TOLERANCE",
           "DEFAULT_NOISE_K", "DEFAULT_SPEEDUP_TOLERANCE", "DEFAULT_STEPS", "DEFAULT_TRACE_EVERY",
           "DEFAULT_VERIFY_BUDGET"]
