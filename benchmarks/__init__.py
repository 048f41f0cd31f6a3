"""jnn's benchmark harness (`python -m benchmarks`, `jnn bench`); one-off studies in `studies/`; see README.md."""
