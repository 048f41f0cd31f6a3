"""SIGKILL at any moment loses nothing: a checkpointing training loop killed 20 times, then resumed,
ends bit for bit where an uninterrupted run ends (kills land during steps, saves and deletions)."""
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from tests._zygote import JNN_TRAIN_IMPORTS, Zygote

KILLS = 20
TARGET = 150

CHILD = r"""
import sys
import jax, numpy as np, optax
import jnn
from tests._tiny import TinyMLP

def batch(step):
    rng = np.random.default_rng(step)
    return {"inputs": rng.normal(size=(16, 5)).astype(np.float32), "labels": rng.integers(0, 3, 16).astype(np.int32)}

def fresh():
    return jnn.create_train_state(TinyMLP(), optax.adam(1e-2), batch(0)["inputs"][:1], 0)

def main(directory, target):
    state = fresh()
    step = jax.jit(jnn.make_train_step("cross_entropy"))
    with jnn.Checkpointer(directory, keep=2) as ckpt:
        if ckpt.all_steps():
            state, _ = ckpt.restore(state)
        while int(state.step) < target:
            state, _ = step(state, batch(int(state.step)))
            ckpt.save(state)
            print(int(state.step), flush=True)
    np.savez(directory + ".final.npz", *[np.asarray(x) for x in jax.tree.leaves(state.params)])

if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
"""


# What the child imports, imported once by a zygote (tests/_zygote.py) that forks each restart: a
# restart reaches its first step in ~0.6 s, without the ~2 s of imports each time.
LOOP_IMPORTS = ("numpy", "jax", "optax", "flax.linen", "jnn", "jnn.checkpoint", "jnn.train", "tests._tiny")


def _loop_env(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
            "PYTHONPATH": root,
            # Restarts load the compiled programs instead of compiling them again (as `jnn train` does), so
            # the kills land in steps, saves and deletions rather than in the compiler.
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla-cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _start(zygote, script, directory):
    return zygote.start([sys.executable, str(script), str(directory), str(TARGET)], env=zygote.env,
                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_checkpointing_loop_survives_20_sigkills_bit_for_bit(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = np.random.default_rng(0)
    killed_at = []
    with Zygote(_loop_env(tmp_path), LOOP_IMPORTS) as zygote:
        for _ in range(KILLS):
            proc = _start(zygote, script, tmp_path / "ckpt")
            line = proc.stdout.readline()  # it is training and saving
            if not line:  # finished already
                proc.wait()
                break
            time.sleep(float(rng.uniform(0.0, 0.4)))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()
            killed_at.append(int(line))
        proc = _start(zygote, script, tmp_path / "ckpt")
        proc.communicate(timeout=300)
        assert proc.returncode == 0 and len(killed_at) == KILLS, (proc.returncode, killed_at)
        straight = tmp_path / "straight"
        proc = _start(zygote, script, straight)
        proc.communicate(timeout=300)
    resumed = np.load(str(tmp_path / "ckpt") + ".final.npz")
    want = np.load(str(straight) + ".final.npz")
    chex.assert_trees_all_equal([resumed[k] for k in sorted(resumed.files)], [want[k] for k in sorted(want.files)])



JNN_TRAIN_STEPS = 400


def _jnn_train_env(cache):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**{k: v for k, v in os.environ.items() if not k.startswith("JNN_")}, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": root,
            "JNN_COMPILATION_CACHE": str(cache)}


def _jnn_train(zygote, run):
    """`jnn train` of a debug digits run in `run`: `--resume` once it has a checkpoint, else the same
    command again (a run killed before its first checkpoint starts over in place)."""
    ckpt = run / "checkpoints"
    if ckpt.is_dir() and any(d.isdigit() for d in os.listdir(ckpt)):
        args = ["--resume", str(run)]
    else:
        args = ["--debug", "--run-dir", str(run), "--set", f"train.steps={JNN_TRAIN_STEPS}",
                "--set", "train.eval_every=8", "--set", "train.log_every=4"]
    return zygote.start([sys.executable, "-m", "jnn.cli", "train", "--no-progress", *args], env=zygote.env,
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _latest(run) -> int:
    ckpt = run / "checkpoints"
    return max((int(d) for d in os.listdir(ckpt) if d.isdigit()), default=0) if ckpt.is_dir() else 0


def _final_params(run):
    import jnn
    from jnn import experiment

    exp = experiment.build(experiment.read_config(str(run)))
    with jnn.Checkpointer(run / "checkpoints") as ckpt:
        state, _ = ckpt.restore(exp.state, step=JNN_TRAIN_STEPS)
    return jax.tree.map(np.asarray, {"params": state.params, "opt_state": state.opt_state,
                                     "model_state": state.model_state})


@pytest.mark.slow
def test_jnn_train_survives_20_sigkills_and_resumes_bit_for_bit(tmp_path):
    """`jnn train` SIGKILLed 20 times and restarted each time ends with the same parameters,
    optimizer state and test metrics as one uninterrupted run. Half the kills land at a random
    moment of start-up (data, compile, restore: the imports are the zygote's, done once), half
    during training (steps, evaluations, saves and deletions of checkpoints)."""
    run, cache = tmp_path / "killed", tmp_path / "xla-cache"
    rng = np.random.default_rng(0)
    stages = []
    with Zygote(_jnn_train_env(cache), JNN_TRAIN_IMPORTS) as zygote:
        for i in range(KILLS):
            proc = _jnn_train(zygote, run)
            if i % 2:  # during training: once it has saved a new checkpoint
                before, deadline = _latest(run), time.monotonic() + 120
                while _latest(run) == before and proc.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.01)
                time.sleep(float(rng.uniform(0.0, 0.5)))
            else:  # during start-up: it trains ~1.4 s after its start (a warm compilation cache)
                time.sleep(float(rng.uniform(0.0, 1.5)))
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate()
            assert proc.returncode == -signal.SIGKILL, f"kill {i}: the run ended on its own: {err[-2000:]}"
            stages.append(_latest(run))
        proc = _jnn_train(zygote, run)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        straight = tmp_path / "straight"
        proc = _jnn_train(zygote, straight)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    print(f"{KILLS} kills of jnn train; latest checkpoint step after each: {stages}")
    assert len(set(stages)) >= 5  # the kills landed all along the run
    chex.assert_trees_all_equal(_final_params(run), _final_params(straight))
    assert (run / "test_metrics.json").read_text() == (straight / "test_metrics.json").read_text()
