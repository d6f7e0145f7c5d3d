"""Who may do what: principals from the auth file (bearer-token digests and
mTLS identities), per-ledger roles, and the check every call passes."""
