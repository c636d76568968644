"""Performance figures of docs/design.md, measured: `python -m benchmarks` (add --quick for a short run)."""
