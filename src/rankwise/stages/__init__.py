"""What runs after the rank curve: target sets, co-tuning, per-layer ranks, the final trial."""
