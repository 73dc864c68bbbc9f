"""Inference above the model and the data: text-level generation (templates and images in, strings out)."""
