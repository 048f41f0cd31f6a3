"""A scheduler's signal loses nothing: fit finishes the step, saves it, raises Preempted (exit 75);
resuming ends bit for bit where an uninterrupted run ends. One writer per run directory."""
import contextlib
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import optax
import pytest

import jnn
from jnn import _claim
from jnn.train.preemption import PREEMPTED_EXIT_CODE
from tests._tiny import TinyBNDropout
from tests._zygote import JNN_TRAIN_IMPORTS, Zygote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 40


def _data():
    rng = np.random.default_rng(0)
    return {"inputs": rng.normal(size=(64, 5)).astype(np.float32), "labels": rng.integers(0, 3, 64).astype(np.int32)}


class SignalAt:
    """A writer that sends `signum` to this process when step `at` is logged (`times` times)."""

    def __init__(self, at, signum=signal.SIGTERM, times=1):
        self.at, self.signum, self.times = at, signum, times

    def write(self, step, metrics, split="train"):
        if split == "train" and step == self.at:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def _fit(directory, stop_signal=None, restore=False):
    state = jnn.create_train_state(TinyBNDropout(), optax.adam(1e-2), _data()["inputs"][:1], 0)
    with jnn.Checkpointer(directory, keep=2) as ckpt:
        data_state = None
        if restore:
            state, data_state = ckpt.restore(state)
        return jnn.fit(state, jnn.data.Pipeline(_data(), 16, seed=0), num_steps=STEPS, loss_fn="cross_entropy",
                       checkpointer=ckpt, data_state=data_state, log_every=1, eval_every=15,
                       eval_data=jnn.data.Pipeline(_data(), 32, train=False), writer=stop_signal)


def _arrays(state):
    return jax.device_get((state.params, state.opt_state, state.model_state))


@pytest.mark.parametrize("signum, times", [(signal.SIGTERM, 1), (signal.SIGUSR1, 1), (signal.SIGTERM, 3)])
def test_fit_stops_at_a_step_boundary_saves_and_resumes_bit_for_bit(tmp_path, signum, times):
    whole = _fit(tmp_path / "whole")
    with pytest.raises(jnn.Preempted) as stopped:
        _fit(tmp_path / "run", SignalAt(17, signum, times))  # a second and third signal during the stop: ignored
    assert stopped.value.code == PREEMPTED_EXIT_CODE == 75
    assert (stopped.value.step, stopped.value.signal_name, stopped.value.saved) == (17, signal.Signals(signum).name, True)
    assert int(stopped.value.result.state.step) == 17
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    resumed = _fit(tmp_path / "run", restore=True)
    chex.assert_trees_all_equal(_arrays(resumed.state), _arrays(whole.state))


class SignalsDuringSave(jnn.Checkpointer):
    """A checkpointer that receives SIGTERM while it saves (as a scheduler's second signal would)."""

    def save(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return super().save(*args, **kwargs)


def test_a_second_signal_during_the_save_changes_nothing(tmp_path, capfd):
    whole = _fit(tmp_path / "whole")
    state = jnn.create_train_state(TinyBNDropout(), optax.adam(1e-2), _data()["inputs"][:1], 0)
    with SignalsDuringSave(tmp_path / "run", keep=2) as ckpt, pytest.raises(jnn.Preempted) as stopped:
        jnn.fit(state, jnn.data.Pipeline(_data(), 16, seed=0), num_steps=STEPS, loss_fn="cross_entropy",
                checkpointer=ckpt, log_every=1, eval_every=100, writer=SignalAt(12))
    assert stopped.value.step == 12 and "received again: already stopping" in capfd.readouterr().err
    resumed = _fit(tmp_path / "run", restore=True)
    chex.assert_trees_all_equal(_arrays(resumed.state), _arrays(whole.state))


def test_sigint_saves_then_raises_keyboard_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt, match="stopped at step 9 with a checkpoint"):
        _fit(tmp_path / "run", SignalAt(9, signal.SIGINT))
    with jnn.Checkpointer(tmp_path / "run", read_only=True) as ckpt:
        assert ckpt.all_steps() == [9]


# ---- one writer per directory ------------------------------------------------------------------


def test_a_second_checkpointer_on_a_directory_is_refused_naming_the_holder(tmp_path):
    with jnn.Checkpointer(tmp_path / "ckpt"):
        with pytest.raises(_claim.ClaimedError, match=rf"being written by host \S+, pid {os.getpid()}, started "):
            jnn.Checkpointer(tmp_path / "ckpt")
        with jnn.Checkpointer(tmp_path / "ckpt", read_only=True) as reader:  # readers are welcome, writers are not
            with pytest.raises(ValueError, match=r"read_only=True\) cannot save"):
                reader.save(jnn.create_train_state(TinyBNDropout(), optax.sgd(0.1), _data()["inputs"][:1], 0))
    jnn.Checkpointer(tmp_path / "ckpt").close()  # released with close()


def test_a_claim_dies_with_its_process(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import jnn._claim as c, time; c.Claim({str(tmp_path)!r}).acquire(); "
                               f"print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": ROOT})
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(_claim.ClaimedError, match=f"pid {holder.pid}"):
        _claim.probe(str(tmp_path))
    holder.kill()  # SIGKILL: no clean-up runs
    holder.wait()
    _claim.probe(str(tmp_path))
    _claim.Claim(tmp_path).acquire().release()


# ---- jnn train, with real signals and a second writer ---------------------------------------------

TRAIN_STEPS = 300  # the stops land at random steps in [50, 175]; evaluations at 100, 200 and 300


def _env(cache):
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("JNN_", "SLURM_", "OMPI_"))},
            "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": ROOT,
            "JNN_COMPILATION_CACHE": str(cache)}


def jnn_train(run, cache, *extra, processes=1, zygote=None):
    """`jnn train` of a debug digits run: `--resume` once `run` has a checkpoint; forked by `zygote`
    (tests/_zygote.py: the imports done once) when one is given."""
    ckpt = run / "checkpoints"
    if ckpt.is_dir() and any(d.isdigit() for d in os.listdir(ckpt)):
        args = ["--resume", str(run)]
    else:
        args = ["--debug", "--run-dir", str(run), "--set", f"train.steps={TRAIN_STEPS}", "--set", "train.eval_every=100",
                "--set", "train.log_every=25"]
    if processes > 1:
        args += ["--processes", str(processes)]
    argv = [sys.executable, "-m", "jnn.cli", "train", "--no-progress", *args, *extra]
    if zygote is not None:
        return zygote.start(argv, env=_env(cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache))


def _records(run):
    path = run / "metrics.jsonl"
    return [(r["split"], r["step"]) for r in jnn.writers.read_jsonl(path)] if path.exists() else []


def _steps(run):
    ckpt = run / "checkpoints"
    return [int(d) for d in os.listdir(ckpt) if d.isdigit()] if ckpt.is_dir() else []


def _wait_for_training(proc):
    """Reads `jnn train`'s output up to its "training ..." line (the signal handlers are in place)."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(("training ", "resumed ")):
            return "".join(lines)
    return "".join(lines)


def final_state(run, step=TRAIN_STEPS):
    from jnn import experiment

    _, state = experiment.restore(str(run), step=step)
    return jax.tree.map(np.asarray, {"params": state.params, "opt_state": state.opt_state,
                                     "model_state": state.model_state})


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_jnn_train_preempted_at_random_moments_resumes_bit_for_bit(tmp_path, processes):
    """SIGTERM at random moments of training (to the process, or to the launcher of 2 processes,
    which forwards it): each stop saves its step and exits 75; the resumed run ends with the same
    parameters, optimizer state and test metrics as an uninterrupted one, and writes no record twice."""
    cache, run, rng = tmp_path / "xla", tmp_path / "preempted", np.random.default_rng(processes)
    # One process: forked by a zygote. Two: the launcher starts them (fresh interpreters).
    with Zygote(_env(cache), JNN_TRAIN_IMPORTS) if processes == 1 else contextlib.nullcontext() as zygote:
        stops = _preempt_and_finish(run, cache, rng, processes, zygote)
        straight = tmp_path / "straight"
        proc = jnn_train(straight, cache, processes=processes, zygote=zygote)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    print(f"{processes} process(es): (stop step, checkpoint save s, signal to exit s): {stops}")
    chex.assert_trees_all_equal(final_state(run), final_state(straight))
    assert (run / "test_metrics.json").read_text() == (straight / "test_metrics.json").read_text()
    records = _records(run)
    assert len(records) == len(set(records)) and set(records) == set(_records(straight))


def _preempt_and_finish(run, cache, rng, processes, zygote):
    """SIGTERM at 3 (or 2) random steps, each stop checked, then the run resumed to its end."""
    stops, last = [], 0
    for target in sorted(rng.choice(np.arange(50, TRAIN_STEPS - 100, 25), 3 if processes == 1 else 2, replace=False)):
        proc = jnn_train(run, cache, processes=processes, zygote=zygote)
        head = _wait_for_training(proc)
        # Until this run logs a step at or past the random target, and past the step it resumed from
        # (the records before it are the previous run's: a fast run can overshoot the next target
        # before its stop): the signal lands mid-training.
        while proc.poll() is None and max([s for split, s in _records(run) if split == "train"] + [0]) < max(target, last + 1):
            time.sleep(0.01)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        out = head + out
        assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
        assert "continue with `jnn train --resume" in out
        saved_in = float(err.split("checkpoint saved in ")[1].split(" s")[0])
        stops.append((int(err.split("stopped at step ")[1].split(";")[0]), saved_in,
                      round(time.monotonic() - signalled, 2)))
        assert stops[-1][0] > last
        last = stops[-1][0]
    proc = jnn_train(run, cache, processes=processes, zygote=zygote)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return stops


@pytest.mark.slow
def test_a_second_jnn_train_on_a_running_run_is_refused_at_once(tmp_path):
    cache, run = tmp_path / "xla", tmp_path / "run"
    first = jnn_train(run, cache, "--set", "train.steps=100000")
    _wait_for_training(first)
    for again in (["--resume", str(run)], ["--run-dir", str(run), "--debug"]):
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "jnn.cli", "train", *again], capture_output=True, text=True,
                                env=_env(cache), timeout=60)
        seconds = time.monotonic() - started
        print(f"{' '.join(again[:1])}: refused in {seconds:.2f} s: {second.stderr.strip()}")
        assert second.returncode == 2 and f"pid {first.pid}" in second.stderr and "being written by host" in second.stderr
    deadline = time.monotonic() + 120
    while not _steps(run) and time.monotonic() < deadline:  # until it has saved a checkpoint
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # the holder dies without clean-up: its claim goes with it
    first.wait()
    latest = max(_steps(run))
    resumed = jnn_train(run, cache, "--stop-at", str(latest + 20))
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
