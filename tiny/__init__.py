"""Tiny, deterministic stand-ins for the real checkpoints: built locally in seconds, used by the
tests and by the demo workflow when no real weights are present."""
