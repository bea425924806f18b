"""Low-level helpers shared by every stage (seeds, hashing, atomic writes, the executor setting)."""
