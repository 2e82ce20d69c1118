"""Tuned kernel configurations shipped with dynconv: one JSON file per GPU (see kernels/configs.py)."""
