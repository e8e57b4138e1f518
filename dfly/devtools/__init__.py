"""Helpers for demos, tests and benchmarks (not used by the daemons)."""
