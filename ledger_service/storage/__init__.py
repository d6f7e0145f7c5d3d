"""Storage: tables, the repository and the unit of work (Postgres or SQLite)."""
