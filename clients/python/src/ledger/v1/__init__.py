"""Generated stubs for package ledger.v1; regenerate with `make generate`."""
