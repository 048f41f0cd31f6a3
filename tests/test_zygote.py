"""The zygote (tests/_zygote.py) that the SIGKILL and preemption tests start `jnn train` from: each
child behaves as a fresh `python -m ...` / `python script.py` would, in the same environment."""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests._zygote import JNN_TRAIN_IMPORTS, Zygote

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}

SCRIPT = textwrap.dedent("""
    import os, sys
    print(sys.argv[1:], os.getcwd(), os.environ.get("JNN_TAG"), sys.path[0], __name__, flush=True)
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "raise":
        raise RuntimeError("boom")
    if sys.argv[1] == "sleep":
        import time; time.sleep(60)
    sys.exit(int(sys.argv[1]))
""")


@pytest.fixture(scope="module")
def zygote():
    with Zygote(ENV, JNN_TRAIN_IMPORTS) as z:
        yield z


def test_a_child_runs_a_script_as_python_would(zygote, tmp_path, monkeypatch):
    script = tmp_path / "child.py"
    script.write_text(SCRIPT)
    monkeypatch.chdir(tmp_path)
    child = zygote.start([sys.executable, str(script), "3"], env={**ENV, "JNN_TAG": "a"}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 3 and child.pid != os.getpid()
    assert out == f"['3'] {tmp_path} a {tmp_path} __main__\n" and err == "to stderr\n"
    failed = zygote.start([sys.executable, str(script), "raise"], env=ENV, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    _, err = failed.communicate(timeout=60)
    assert failed.returncode == 1 and "RuntimeError: boom" in err


def test_children_run_at_once_and_die_of_a_real_sigkill(zygote, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(SCRIPT)
    sleeper = zygote.start([sys.executable, str(script), "sleep"], env=ENV, stdout=subprocess.PIPE)
    assert sleeper.stdout.readline().startswith("['sleep']")
    quick = zygote.start([sys.executable, str(script), "0"], env=ENV, stdout=subprocess.DEVNULL)
    assert quick.wait(timeout=60) == 0 and sleeper.poll() is None  # one ended while the other runs
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper.wait(timeout=0.1)
    sleeper.send_signal(signal.SIGKILL)
    assert sleeper.wait(timeout=60) == -signal.SIGKILL
    sleeper.stdout.close()


def test_a_module_child_sees_what_a_fresh_interpreter_sees(zygote):
    """`python -m jnn.cli info` from the zygote prints what a fresh interpreter prints (jnn's
    default XLA flags, set when jnn is imported, included)."""
    argv = [sys.executable, "-m", "jnn.cli", "info"]
    fresh = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=120)
    forked = zygote.start(argv, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = forked.communicate(timeout=120)
    assert forked.returncode == fresh.returncode == 0 and out == fresh.stdout and "devices (2)" in out
    flags = "import os, jnn; print(os.environ['XLA_FLAGS'])"
    fresh = subprocess.run([sys.executable, "-c", flags], env=ENV, capture_output=True, text=True, timeout=120)
    script = zygote.start([sys.executable, "-c", flags], env=ENV, stdout=subprocess.PIPE)
    assert script.communicate(timeout=60)[0] == fresh.stdout and "xla_force_host_platform_device_count=2" in fresh.stdout


def test_a_jnn_train_child_has_imported_what_jnn_train_imports_and_no_more(zygote):
    """The children of the `jnn train` zygote have tensorboardX's writer, as jnn imports it: without
    PyTorch (where it is installed, a plain `import tensorboardX` imports it too)."""
    probe = "import sys; print(sorted(m for m in ('torch', 'tensorboardX.writer', 'matplotlib.figure') if m in sys.modules))"
    child = zygote.start([sys.executable, "-c", probe], env=ENV, stdout=subprocess.PIPE)
    assert child.communicate(timeout=60)[0].strip() == str(["matplotlib.figure", "tensorboardX.writer"])


def test_what_it_cannot_run_as_a_fresh_interpreter_would_is_refused(zygote):
    with pytest.raises(ValueError, match=r"differs from the zygote's in \['JAX_ENABLE_X64'\]"):
        zygote.start([sys.executable, "-c", "pass"], env={**ENV, "JAX_ENABLE_X64": "1"})
    with pytest.raises(ValueError, match="runs Python commands"):
        zygote.start(["/bin/true"], env=ENV)
    with pytest.raises(ValueError, match="interpreter option '-u'; expected -m, -c or a script"):
        zygote.start([sys.executable, "-u", "-c", "pass"], env=ENV)


def test_a_preload_that_starts_jax_backend_is_refused(tmp_path):
    """Forking an initialised XLA client is unsafe: the zygote checks that its imports did not."""
    (tmp_path / "starts_backend.py").write_text("import jax\njax.devices()\n")
    env = {**ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    with pytest.raises(RuntimeError, match="started JAX's backend"):
        Zygote(env, ("starts_backend",))
