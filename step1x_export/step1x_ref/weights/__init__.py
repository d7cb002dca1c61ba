"""Weights: the official and the diffusers layouts, loading, LoRA merging, seeded random weights."""
