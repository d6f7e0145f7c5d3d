"""The hash chain over each ledger's sequence, and `ledger-service verify`."""
