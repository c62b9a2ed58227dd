"""The benchmark behind ``sam-fused bench``: models, the per-parameter baseline, timers, the CLI."""
