"""Fused ops for the hot path, each beside its eager reference."""
