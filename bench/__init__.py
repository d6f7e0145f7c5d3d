"""`make bench`: throughput and latency of the ledger against baselines measured
in the same run (see bench/run.py)."""

from pathlib import Path

# The checkout: load processes run there, and results are written under it.
ROOT = Path(__file__).resolve().parent.parent
