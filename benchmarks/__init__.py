"""jnn's benchmark harness (`python -m benchmarks`, `jnn bench`) and the per-topic scripts; see README.md."""
