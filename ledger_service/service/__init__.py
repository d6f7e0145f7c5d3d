"""The service layer: the use cases, group commit, and the ports storage
implements. Depends only on the domain and on its own ports."""
