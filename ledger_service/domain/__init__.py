"""The ledger's domain: entries and accounts, the input limits, and the
errors use cases raise. Imports nothing from the gRPC edge or the database,
so both can depend on it."""
