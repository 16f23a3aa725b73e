"""Collect: one pass over the corpus recording each feature's statistics and sampled contexts."""
