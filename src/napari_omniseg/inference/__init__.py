"""Tiling plans and the batched, streaming multi-tissue inference engine."""
