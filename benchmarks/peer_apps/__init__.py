"""The peer servers' own programs, each run with its peer's virtual environment's Python
(benchmarks/peers.py): never imported by the agent or the benchmark process."""
