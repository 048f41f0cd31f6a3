"""Several processes on localhost (gloo CPU collectives) train like one process with as many devices.

The workers are `examples/data_parallel.py` itself, launched by `jnn.parallel.launch_local`: each
child gets 2 fake CPU devices, a coordinator on a free port and its process id, and loads only its
block of every global batch.
"""
import importlib.util
import json
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
from jnn.writers import read_jsonl
from tests import tolerances as tol

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "data_parallel.py"
STEPS, BATCH = 10, 64
INIT_TIMEOUT_S = 5  # --timeout of the failure tests: peers' connection and heartbeat timeout
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


def _jnn_train_env(port: int, process_id: int | None = None) -> dict:
    env = _clean_env()
    env.update(JNN_COORDINATOR=f"127.0.0.1:{port}", JNN_NUM_PROCESSES="2", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=1", JNN_COMPILATION_CACHE="")
    if process_id is not None:
        env["JNN_PROCESS_ID"] = str(process_id)
    return env


JNN_TRAIN = [sys.executable, "-m", "jnn.cli", "train", "--debug", "--timeout", str(INIT_TIMEOUT_S)]


def _logged_train_steps(run) -> list[int]:
    path = run / "metrics.jsonl"
    return [r["step"] for r in read_jsonl(path) if r["split"] == "train"] if path.exists() else []


@pytest.mark.slow
def test_missing_peer_exits_with_a_jnn_message_within_timeout_plus_5_s(tmp_path):
    """Process 1 of 2 whose coordinator never starts: one jnn line, PEER_EXIT_CODE, no hang.

    The bound is on the time past a bare `import jnn` in a fresh process under the same load (the
    timeout counts from `jax.distributed.initialize`, not from the interpreter's start)."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import jnn.cli, jax; jax.devices()"], check=True)
    startup = time.monotonic() - start
    start = time.monotonic()
    proc = subprocess.run(JNN_TRAIN + ["--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                          env=_jnn_train_env(parallel.free_port(), 1), timeout=HANG_LIMIT_S)
    elapsed = time.monotonic() - start
    print(f"missing peer: exit code {proc.returncode} after {elapsed:.1f} s, {startup:.1f} s of it the start-up "
          f"(timeout {INIT_TIMEOUT_S} s)")
    assert proc.returncode == parallel.PEER_EXIT_CODE, proc.stderr[-2000:]
    assert "jnn: process 1 of 2: the 2 processes did not all connect" in proc.stderr
    assert elapsed - startup <= INIT_TIMEOUT_S + 5
    assert not (tmp_path / "run").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0], ids=["peer_killed", "coordinator_killed"])
def test_process_killed_mid_run_stops_the_run_then_resume_continues(tmp_path, victim):
    """SIGKILL one of 2 `jnn train` processes after its second checkpoint: the other exits at once
    with a jnn message and PEER_EXIT_CODE (bounded by the timeout + 5 s, 0 hangs); then
    `jnn train --processes 2 --resume` continues from the last checkpoint to the end."""
    run = tmp_path / "run"
    argv = JNN_TRAIN + ["--run-dir", str(run), "--set", "train.steps=160", "--set", "train.eval_every=40",
                        "--set", "train.log_every=10"]
    port = parallel.free_port()
    procs = [subprocess.Popen(argv, env=_jnn_train_env(port, i), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    try:
        checkpoints = run / "checkpoints"
        deadline = time.monotonic() + HANG_LIMIT_S
        # After the second checkpoint, once both processes train again: a process inside the save's
        # barrier when its peer dies is JAX's to abort (heartbeat), not a collective's to fail.
        while not (len(steps := [int(d) for d in os.listdir(checkpoints) if d.isdigit()]
                       if checkpoints.is_dir() else []) >= 2 and max(_logged_train_steps(run) + [0]) > max(steps)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "run did not get going"
            time.sleep(0.05)
        procs[victim].kill()
        killed = time.monotonic()
        _, err = procs[1 - victim].communicate(timeout=INIT_TIMEOUT_S + 5)
        elapsed = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    saved = max(int(d) for d in os.listdir(checkpoints) if d.isdigit())
    print(f"{'coordinator' if victim == 0 else 'peer'} killed: the other exited with code "
          f"{procs[1 - victim].returncode} after {elapsed:.2f} s; last checkpoint step {saved}")
    assert procs[1 - victim].returncode == parallel.PEER_EXIT_CODE, err[-3000:]
    assert f"jnn train: error: process {1 - victim} of 2:" in err
    assert f"jnn train --resume {run}" in err

    env = {k: v for k, v in _jnn_train_env(port).items() if not k.startswith("JNN_") or k == "JNN_COMPILATION_CACHE"}
    resumed = subprocess.run([sys.executable, "-m", "jnn.cli", "train", "--processes", "2", "--timeout", "30",
                              "--resume", str(run)], env=env, capture_output=True, text=True, timeout=HANG_LIMIT_S)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run} at step {saved}" in resumed.stdout
    assert resumed.stdout.count("resumed") == 1  # process 0 alone prints
    test = json.loads((run / "test_metrics.json").read_text())
    assert test["accuracy"] > 0.8
    print(f"resumed from step {saved} to 160 with 2 processes: test accuracy {test['accuracy']:.4f}")


def test_launcher_kills_the_others_when_one_fails():
    script = ("import os, sys, time\n"
              "if os.environ['JNN_PROCESS_ID'] == '1': sys.exit(3)\n"
              "time.sleep(60)\n")
    start = time.monotonic()
    assert parallel.launch_local([sys.executable, "-c", script], 2, timeout_s=HANG_LIMIT_S) == 3
    assert time.monotonic() - start < 30  # process 0 was killed, not waited for


def test_launcher_sets_the_device_count_and_keeps_the_other_xla_flags(monkeypatch):
    """A user's own XLA flags (a dump directory, an optimisation level) reach every child."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/dumps --xla_force_host_platform_device_count=8")
    script = ("import os, sys\n"
              "want = '--xla_dump_to=/tmp/dumps --xla_force_host_platform_device_count=3'\n"
              "sys.exit(0 if os.environ['XLA_FLAGS'] == want else 5)\n")
    assert parallel.launch_local([sys.executable, "-c", script], 2, devices_per_process=3, timeout_s=HANG_LIMIT_S) == 0


def test_launcher_timeout_kills_everything():
    code = parallel.launch_local([sys.executable, "-c", "import time; time.sleep(60)"], 2, timeout_s=1)
    assert code == 124


def test_example_runs_two_steps_in_process(capsys, monkeypatch):
    for key in ("JNN_COORDINATOR", "JNN_NUM_PROCESSES", "JNN_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    assert _example().main(["--steps", "2", "--batch-size", "64"]) == 0
    assert "1 process(es) x 8 device(s), mode jit: params checksum" in capsys.readouterr().out
