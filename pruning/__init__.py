"""Learned depth pruning of SD3-family transformers: the TinySR search, the paper's baselines, and export."""
