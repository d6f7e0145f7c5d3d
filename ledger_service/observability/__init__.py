"""What the server tells its operators: Prometheus metrics (metrics.py), logs
as text or JSON lines (logs.py), and what each call's end records (calls.py)."""
