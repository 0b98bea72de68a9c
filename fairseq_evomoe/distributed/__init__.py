"""Launch helpers for multi-process training (see docs/distributed.md)."""
