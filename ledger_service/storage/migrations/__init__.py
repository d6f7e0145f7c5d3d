"""Alembic migrations of the ledger schema; applied by `ledger-service migrate`."""
