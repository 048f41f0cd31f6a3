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


def _start(script, directory):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": root}
    return subprocess.Popen([sys.executable, str(script), str(directory), str(TARGET)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)


@pytest.mark.slow
def test_checkpointing_loop_survives_20_sigkills_bit_for_bit(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = np.random.default_rng(0)
    killed_at = []
    for _ in range(KILLS):
        proc = _start(script, tmp_path / "ckpt")
        line = proc.stdout.readline()  # it is training and saving
        if not line:  # finished already
            proc.wait()
            break
        time.sleep(float(rng.uniform(0.0, 0.4)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(int(line))
    proc = _start(script, tmp_path / "ckpt")
    proc.communicate(timeout=300)
    assert proc.returncode == 0 and len(killed_at) == KILLS, (proc.returncode, killed_at)
    resumed = np.load(str(tmp_path / "ckpt") + ".final.npz")
    straight = tmp_path / "straight"
    proc = _start(script, straight)
    proc.communicate(timeout=300)
    want = np.load(str(straight) + ".final.npz")
    chex.assert_trees_all_equal([resumed[k] for k in sorted(resumed.files)], [want[k] for k in sorted(want.files)])
