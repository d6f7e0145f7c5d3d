"""`make bench`: throughput and latency of the ledger against baselines measured
in the same run (see bench/run.py)."""
