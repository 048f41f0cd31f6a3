"""One-off studies beside the harness, each a module: `python -m benchmarks.studies.<name>`.

Each answers one question the harness raised (the guard's cost, W4's matrix products, CPU
convolutions, precision policies, the step's overhead, the input pipeline, the default `jnn train`)
and writes `benchmarks/results/studies/<name>-<date>.json` and `.md`; see README.md there.
"""
