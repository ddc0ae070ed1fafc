"""Torch-free judging of results: the gate, gaps to fp32, verdicts, recommendations' search, compare, suites."""
