"""Generated protobuf packages of the ledger contract (see protos/)."""
