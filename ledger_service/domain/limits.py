"""The input limits: part of the public contract (documented on the proto
fields and in the README)."""

from __future__ import annotations

import re

INT64_MAX = 2**63 - 1

# Input limits. They are part of the public contract (documented on the proto
# fields and in the README); the worst-case entry they allow is ~10.5 KiB, so a
# stream message of STREAM_MESSAGE_MAX_ENTRIES stays well under gRPC's 4 MiB.
LEDGER_MAX_CHARS = 64
KEY_MAX_CHARS = 128
ACCOUNT_MAX_CHARS = 128
ASSET_MAX_CHARS = 32
ENTRY_TYPE_MAX_CHARS = 64
DESCRIPTION_MAX_CHARS = 1024
METADATA_MAX_PAIRS = 32
METADATA_KEY_MAX_CHARS = 64
METADATA_VALUE_MAX_CHARS = 256
METADATA_MAX_BYTES = 4096
STREAM_MESSAGE_MAX_ENTRIES = 256
BATCH_MAX_ENTRIES = 1000

LEDGER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]*")
ASSET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/-]*")
# C0/C1 control characters (NUL included): they break logs, terminals and
# Postgres text (which rejects NUL outright).
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
