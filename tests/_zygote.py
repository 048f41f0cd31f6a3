"""Restart a test's process in a fraction of a second: a zygote imports once, then forks each run.

The SIGKILL and preemption tests start the same command 6 to 22 times in a row (`jnn train`, or a
small training script), and every start imported jax, flax, optax, orbax and jnn again: about 2 s
of CPU of each ~4 s restart. A `Zygote` is a Python process that imports those once, without
starting JAX's backend (no devices, no XLA threads), then forks a child per `start`. Each child is
a real process: its own pid, JAX backend, compilation, files and signal handlers, killed by a real
SIGKILL; it runs the command as `python -m module ...` or `python script.py ...` would (as
`__main__`, with its atexit handlers at exit).

A fresh interpreter reads its environment at import (JAX its `JAX_*` options, jnn its XLA
defaults), so a zygote only runs commands in the environment it was started with: `start` refuses
another one, except for `JNN_*` variables, which jnn reads when a command runs. Several children
can run at once. What the imports themselves set in the environment (jnn's default XLA flags)
reaches every child, as it would reach a fresh process. The imports are what a fresh process would
also do: only the time they take is saved, and a kill can no longer land in the middle of them.

Used where the restarts are sequential: the processes of one multi-process run start together, and
a zygote that imports first, then forks both, saved nothing there (measured: the 2-process cluster
launch took 44.9 s with it, 38.3 s without).
"""
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time

_SERVE = "serve"


# What may differ between a zygote's children: read by jnn when a command runs, not at import.
VARYING = ("JNN_",)


def _varying(key: str) -> bool:
    return key.startswith(VARYING)


# What `jnn train` imports: jnn.experiment, and its writers' matplotlib, tensorboardX and tqdm.
# tensorboardX as jnn imports it (`jnn.writers.summary_writer`): a plain `import tensorboardX` would
# also import PyTorch where it is installed, which a `jnn train` process never does.
JNN_TRAIN_IMPORTS = ("jnn.experiment", "matplotlib.figure", "matplotlib.backends.backend_agg",
                     "jnn.writers:summary_writer", "tqdm")


class Zygote:
    """Forks processes that have already imported `preload` (module names; "module:function" also
    calls that function once imported); a context manager (stops them all)."""

    def __init__(self, env: dict, preload: tuple[str, ...]):
        self.env = dict(env)
        self._sock, theirs = socket.socketpair()
        self._server = subprocess.Popen([sys.executable, "-m", "tests._zygote", _SERVE, str(theirs.fileno()),
                                         *preload], pass_fds=[theirs.fileno()], env=self.env)
        theirs.close()
        ready = self._sock.recv(4096)
        if not ready.startswith(b"ready"):
            self._server.wait()
            raise RuntimeError(f"the zygote did not start: {ready!r} (its stderr is above)")
        self._children: list[Child] = []
        self._started: int | None = None
        self._exits: dict[int, int] = {}

    def start(self, argv, *, env: dict, stdout=None, stderr=None, text: bool = True) -> "Child":
        """Like `subprocess.Popen(argv, env=env, stdout=..., stderr=...)` for `argv` =
        `[sys.executable, "-m", module, ...]`, `[sys.executable, "-c", code, ...]` or
        `[sys.executable, script, ...]`."""
        if argv[0] != sys.executable:
            raise ValueError(f"Zygote.start runs Python commands; got {argv[0]!r}, expected sys.executable")
        if argv[1].startswith("-") and argv[1] not in ("-m", "-c"):  # the zygote's interpreter is already set up
            raise ValueError(f"Zygote.start: interpreter option {argv[1]!r}; expected -m, -c or a script. "
                             f"Start a subprocess for that command instead.")
        differs = sorted(k for k in set(env) | set(self.env) if not _varying(k) and env.get(k) != self.env.get(k))
        if differs:
            raise ValueError(f"Zygote.start: the environment differs from the zygote's in {differs}; start "
                             f"another Zygote with that environment (only variables starting with {VARYING} "
                             f"may differ).")
        ends, theirs = [], []
        for want, inherited in ((stdout, 1), (stderr, 2)):
            if want == subprocess.PIPE:
                read, write = os.pipe()
                ends.append(os.fdopen(read, "r" if text else "rb"))
                theirs.append(write)
            elif want == subprocess.DEVNULL:
                ends.append(None)
                theirs.append(os.open(os.devnull, os.O_WRONLY))
            else:  # None: this process's; or a file
                ends.append(None)
                theirs.append(inherited if want is None else want.fileno())
        request = json.dumps({"argv": list(argv[1:]), "env": {k: v for k, v in env.items() if _varying(k)},
                              "cwd": os.getcwd()}).encode()
        socket.send_fds(self._sock, [request], theirs)
        for fd, want in zip(theirs, (stdout, stderr)):
            if want in (subprocess.PIPE, subprocess.DEVNULL):
                os.close(fd)
        while self._started is None:
            self._receive(None)
        child, self._started = Child(self, self._started, *ends), None
        self._children.append(child)
        return child

    def _receive(self, timeout: float | None) -> bool:
        """Reads one message from the zygote ("pid N" after a start, "exit N STATUS" when a child ends);
        False if none came within `timeout` seconds."""
        if not select.select([self._sock], [], [], timeout)[0]:
            return False
        line = b""
        while not line.endswith(b"\n"):
            chunk = self._sock.recv(1)
            if not chunk:
                raise RuntimeError("the zygote died")
            line += chunk
        kind, *values = line.decode().split()
        if kind == "pid":
            self._started = int(values[0])
        else:
            self._exits[int(values[0])] = os.waitstatus_to_exitcode(int(values[1]))
        return True

    def close(self) -> None:
        for child in self._children:
            if child.poll() is None:
                child.kill()
                child.wait()
        self._sock.close()  # the zygote's loop ends on end-of-file
        try:
            self._server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._server.kill()
            self._server.wait()

    def __enter__(self) -> "Zygote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Child:
    """The part of `subprocess.Popen` the tests use, for a zygote's child (the zygote reaps it)."""

    def __init__(self, zygote: Zygote, pid: int, stdout, stderr):
        self._zygote, self.pid, self.stdout, self.stderr = zygote, pid, stdout, stderr
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.wait(timeout=0, _raise=False)

    def wait(self, timeout: float | None = None, _raise: bool = True) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            if self.pid in self._zygote._exits:
                self.returncode = self._zygote._exits.pop(self.pid)
            elif not self._zygote._receive(None if deadline is None else max(0.0, deadline - time.monotonic())):
                if _raise:
                    raise subprocess.TimeoutExpired(f"zygote child {self.pid}", timeout)
                return None
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None):
        """Reads stdout and stderr (those that are pipes) to their end, then waits."""
        out = {}
        readers = [threading.Thread(target=lambda n=n, f=f: out.__setitem__(n, f.read()), daemon=True)
                   for n, f in (("out", self.stdout), ("err", self.stderr)) if f is not None and not f.closed]
        for reader in readers:
            reader.start()
        for reader in readers:
            reader.join(timeout)
            if reader.is_alive():
                raise subprocess.TimeoutExpired(f"zygote child {self.pid}", timeout)
        self.wait(timeout)
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        return out.get("out"), out.get("err")


# ---- the zygote process ---------------------------------------------------------------------------


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _serve(fd: int, preload: list[str]):
    """Imports `preload`, then forks a child per request until end-of-file. Returns, in the child
    only, what it must run; the zygote itself exits here."""
    import importlib

    sock = socket.socket(fileno=fd)
    for name in preload:  # "module", or "module:function" to call once imported
        module, _, function = name.partition(":")
        imported = importlib.import_module(module)
        if function:
            getattr(imported, function)()
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():  # forking an XLA client is unsafe: a preload bug
        sock.sendall(b"error: importing the preload started JAX's backend\n")
        sys.exit(1)
    sock.sendall(f"ready {_threads()} threads\n".encode())
    children = set()
    while True:
        # A request, or every 20 ms while children run: which have ended (reported, then reaped).
        if not select.select([sock], [], [], 0.02 if children else None)[0]:
            for pid in list(children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    children.remove(pid)
                    sock.sendall(f"exit {pid} {status}\n".encode())
            continue
        message, fds, _, _ = socket.recv_fds(sock, 1 << 20, 2)
        if not message:
            sys.exit(0)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:
            sock.close()
            null = os.open(os.devnull, os.O_RDONLY)
            for target, source in ((0, null), (1, fds[0]), (2, fds[1])):
                os.dup2(source, target)
            for source in {null, *fds}:
                if source > 2:
                    os.close(source)
            os.chdir(request["cwd"])
            for key in [k for k in os.environ if _varying(k)]:
                del os.environ[key]
            os.environ.update(request["env"])  # the rest is the zygote's: what its imports set included
            return request["argv"]
        for source in fds:
            os.close(source)
        children.add(pid)
        sock.sendall(f"pid {pid}\n".encode())


def _run(argv: list[str]) -> None:
    """Runs `argv` (what follows `python`) as the interpreter would: `-m module ...`, `-c code ...`
    or `script ...`."""
    import runpy

    if argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})  # noqa: S102
    elif argv[0] == "-m":
        module = argv[1]
        sys.argv = [module, *argv[2:]]  # run_module puts the module's file in sys.argv[0]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__" and sys.argv[1:2] == [_SERVE]:
    _run(_serve(int(sys.argv[2]), sys.argv[3:]))
