#!/usr/bin/env bash
# The GPU suite as one prepared command for a lent GPU machine with no network (see README.md,
# "The GPU suite"). From the repository root:
#
#   OUT=/some/dir bash benchmarks/gpu_run.sh [extra `python -m benchmarks` arguments]
#
# 1. Installs the wheels in .whl/ (the jnn dependencies such a machine's image lacks, downloaded on a
#    machine with network: grain, array-record, portpicker, tensorboardX, qwix) into /tmp/site.
# 2. Records the GPU, its driver and the package versions in $OUT/machine.txt.
# 3. Checks that jnn imports and JAX sees the GPU (a broken environment stops here, in seconds).
# 4. Runs `python -m benchmarks --suite gpu`, every workload in its own process under
#    --worker-timeout, the whole run under SUITE_TIMEOUT, its output in $OUT/suite.log.
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  nproc
  python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|flax|optax|chex|orbax-checkpoint|numpy|torch|triton|grain|qwix) '
} 2>&1 | tee "$OUT/machine.txt"
python3 -c "import jax, jnn; print('jnn imports; JAX devices:', jax.devices())" 2>&1 | tee -a "$OUT/machine.txt" || exit 1
timeout -k 15 "${SUITE_TIMEOUT:-500}" python3 -m benchmarks --suite gpu --out "$OUT" \
  --worker-timeout "${WORKER_TIMEOUT:-210}" "$@" 2>&1 | tee "$OUT/suite.log"
