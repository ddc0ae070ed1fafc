"""Torch-free numerics: format constants and what-ifs, the per-layer statistics model, and the rules."""
