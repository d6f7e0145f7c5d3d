"""The gRPC edge: servicer, error mapping, proto conversion."""
