"""Baselines run in the Decision Transformer's harness (same data, sampler, training loop, evaluation)."""
