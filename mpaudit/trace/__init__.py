"""The torch side that watches training: hooks with on-device statistics, and per-layer error attribution."""
