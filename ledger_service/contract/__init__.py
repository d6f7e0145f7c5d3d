"""The contract as released, for server reflection: the image
protos/ledger.v1.binpb (`buf build`, comments included), which this package
carries as ledger.v1.binpb (in a checkout, a link to that file)."""
