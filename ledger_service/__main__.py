"""`python -m ledger_service` is the `ledger-service` command."""

import sys

from .cli import main

sys.exit(main())
