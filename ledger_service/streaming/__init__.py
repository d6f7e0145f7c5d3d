"""Live entries for following streams: the per-process wake-ups and the
shared tail each followed ledger reads once per commit."""
