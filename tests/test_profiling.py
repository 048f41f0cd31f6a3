"""jnn.profiling: `fit(profile=...)` writes a jax.profiler trace that holds exactly the chosen steps;
bad step ranges are refused before anything runs."""
import os

import numpy as np
import optax
import pytest

import jnn
from jnn import cli, profiling
from tests._tiny import TinyMLP


def _data(n=32):
    rng = np.random.default_rng(0)
    batch = {"inputs": rng.standard_normal((n, 4)).astype(np.float32), "labels": rng.integers(0, 3, n).astype(np.int32)}
    while True:
        yield batch


def _state():
    return jnn.create_train_state(TinyMLP(), optax.sgd(0.1), np.zeros((1, 4), np.float32), 0)


def test_fit_traces_exactly_the_chosen_steps(tmp_path, capsys):
    profile = profiling.Profile.parse("2:4", tmp_path / "profile")
    result = jnn.fit(_state(), _data(), num_steps=6, loss_fn="cross_entropy", profile=profile, progress=False)
    assert int(result.state.step) == 6
    files = profiling.trace_files(profile.logdir)
    assert {os.path.basename(f).split(".", 1)[1] for f in files} == {"xplane.pb", "trace.json.gz"}
    assert all(os.path.getsize(f) > 0 for f in files)
    out = capsys.readouterr().out
    assert f"profile of steps 2-3 written to {os.path.dirname(files[0])}" in out and "tensorboard --logdir" in out
    events = profiling.read_trace_events(next(f for f in files if f.endswith(".trace.json.gz")))
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train")
    assert steps == [2, 3]  # the two traced steps, annotated with their step numbers, nothing else
    # Host side: jit's dispatch of the compiled step inside each step's annotation.
    annotated = [e for e in events if e.get("name") == "train"]
    calls = [e for e in events if str(e.get("name", "")).startswith("PjitFunction(")]
    assert calls and all(any(a["ts"] <= c["ts"] <= a["ts"] + a["dur"] for a in annotated) for c in calls)
    assert {any(a["ts"] <= c["ts"] <= a["ts"] + a["dur"] for c in calls) for a in annotated} == {True}
    # Device side: the XLA operations of that program, and of no other.
    step_name = calls[0]["name"][len("PjitFunction("):-1]
    modules = {e["args"]["hlo_module"] for e in events if "hlo_module" in e.get("args", {})}
    assert modules == {f"jit_{step_name}"}
    assert sum(1 for e in events if e.get("args", {}).get("hlo_op") == "dot") >= 2
    xplane = open(next(f for f in files if f.endswith(".xplane.pb")), "rb").read()
    assert b"train" in xplane and b"PjitFunction" in xplane


@pytest.mark.parametrize("text, message", [
    ("3", r"--profile '3': expected START:STOP, two step numbers such as 10:12"),
    ("a:b", r"--profile 'a:b': expected START:STOP"),
    ("5:2", r"profile: steps 5:2; expected START:STOP with 0 <= START < STOP"),
])
def test_bad_profile_text(text, message):
    with pytest.raises(ValueError, match=message):
        profiling.Profile.parse(text)


def test_steps_outside_the_run_are_refused_before_training(tmp_path):
    state = _state()
    with pytest.raises(ValueError, match=r"profile: steps 4:9 are not all in this run, which trains steps 0:6; "
                                         r"expected 0 <= START < STOP <= 6\. Fix: .*--profile 1:3"):
        jnn.fit(state, _data(), num_steps=6, loss_fn="cross_entropy",
                profile=profiling.Profile(4, 9, str(tmp_path / "p")))
    assert int(state.step) == 0 and not (tmp_path / "p").exists()  # nothing trained, nothing written


def test_jnn_train_refuses_a_bad_profile_before_anything(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--debug", "--run-dir", str(run), "--profile", "3:20"]) == 2
    assert capsys.readouterr().err.strip() == (
        "jnn train: error: profile: steps 3:20 are not all in this run, which trains steps 0:8; expected "
        "0 <= START < STOP <= 8. Fix: pass steps inside the run, e.g. --profile 1:3.")
    assert cli.main(["train", "--debug", "--run-dir", str(run), "--profile", "ten"]) == 2
    assert "expected START:STOP" in capsys.readouterr().err
    assert not run.exists()
