"""Storage, the ground floor: the run directory and its SQLite store (no torch)."""
