"""End-to-end benchmark: klotski-tier against the systems users would otherwise pick, and the bound.

Every system generates the same greedy tokens for the same prompts (checked) inside a memory
cgroup of the same limit (the budget), each in its own process, page cache evicted before
each run; throughput (generated tokens / prefill + decode time), decode tokens/s, time compute
waited for I/O, bytes read and peak memory are the medians of ``--repeats`` runs, next to the
lower bound ``max(compute with every weight resident, bytes the workload must move / raw drive
bandwidth)`` (see :mod:`benchmarks.e2e.bound`).

Modules: ``model`` (bench checkpoints), ``workload`` (prompts, throughput), ``cgroup`` (memory
groups), ``worker`` (one system in one process) with ``accelerate_peer``, ``systems`` (budgets,
configurations, jobs), ``planning`` (klotski's configuration from the planner, and its
predictions), ``runner`` (processes), ``compare`` (one budget point), ``bound``,
``results``, ``report`` (table, JSON, PNG), ``benchmark`` (the whole run), ``__main__`` (CLI).
"""
