"""Several processes on localhost (gloo CPU collectives) train like one process with as many devices.

The workers are `examples/data_parallel.py` itself, launched by `jnn.parallel.launch_local`: each
child gets 2 fake CPU devices, a coordinator on a free port and its process id, and loads only its
block of every global batch.
"""
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import chex
import jax
import numpy as np
import pytest

from jnn import parallel
from tests import tolerances as tol

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data_parallel.py"
STEPS, BATCH = 10, 64
INIT_TIMEOUT_S = 3  # jax.distributed's initialization_timeout for the missing-peer test
HANG_LIMIT_S = 90  # a run slower than this is a hang (generous: 2 shared CPU cores)


def _example():
    spec = importlib.util.spec_from_file_location("data_parallel_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _clean_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JNN_", "JAX_COORDINATOR"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_two_processes_match_one_process_with_as_many_devices(tmp_path):
    out = tmp_path / "params.npz"
    argv = [sys.executable, str(EXAMPLE), "--steps", str(STEPS), "--batch-size", str(BATCH),
            "--timeout", "30", "--save", str(out)]
    code = parallel.launch_local(argv, 2, devices_per_process=2, timeout_s=HANG_LIMIT_S, env=_clean_env())
    assert code == 0
    example = _example()
    args = example.parse_args(["--steps", str(STEPS), "--batch-size", str(BATCH)])
    want = example.train(args, mesh=parallel.make_mesh(data=4))  # 1 process x 4 devices
    with np.load(out) as got:
        got = {k: got[k] for k in got.files}
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(want)}
    assert sorted(got) == sorted(want)
    chex.assert_trees_all_close(got, want, rtol=tol.PARALLEL_RTOL, atol=tol.PARALLEL_ATOL)
    err = max(float(np.max(np.abs(got[k] - want[k]))) for k in want)
    print(f"2 processes x 2 devices vs 1 x 4: max abs error {err:.3g}")


@pytest.mark.slow
def test_missing_peer_fails_fast_without_hanging():
    """Process 0 of 2 whose peer never starts exits non-zero soon after the init timeout."""
    env = _clean_env()
    env.update(JNN_COORDINATOR=f"127.0.0.1:{parallel.free_port()}", JNN_NUM_PROCESSES="2",
               JNN_PROCESS_ID="0", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "1", "--timeout", str(INIT_TIMEOUT_S)],
                          env=env, capture_output=True, timeout=HANG_LIMIT_S)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    print(f"missing peer: exit code {proc.returncode} after {elapsed:.1f} s")


def test_launcher_kills_the_others_when_one_fails():
    script = ("import os, sys, time\n"
              "if os.environ['JNN_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    assert parallel.launch_local([sys.executable, "-c", script], 2, timeout_s=HANG_LIMIT_S) == 3
    assert time.monotonic() - start < 30  # process 0 was killed, not waited for


def test_launcher_timeout_kills_everything():
    code = parallel.launch_local([sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout_s=1)
    assert code == 124


def test_example_runs_two_steps_in_process(capsys, monkeypatch):
    for key in ("JNN_COORDINATOR", "JNN_NUM_PROCESSES", "JNN_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    assert _example().main(["--steps", "2", "--batch-size", "64"]) == 0
    assert "1 process(es) x 8 device(s), mode jit: params checksum" in capsys.readouterr().out
