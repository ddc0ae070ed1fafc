"""The torch side that measures: step time in interleaved rounds, and peak memory with its breakdown."""
