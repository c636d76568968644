"""Performance figures of DESIGN.md, measured: `python -m benchmarks` (add --quick for a short run)."""
