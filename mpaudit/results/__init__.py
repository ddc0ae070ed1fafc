"""Torch-free results: the one result model every reader uses, its JSON codec, reading and writing."""
