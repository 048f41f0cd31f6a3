"""`launch_local`: N processes of one JAX run on this machine, owned by the process that starts them.

Free of JAX (and of the rest of `jnn.parallel`): the launcher of `jnn train --processes N` only
starts, watches and signals its children, so it does not pay JAX's import (about 0.5 s, before any
child could start) nor keep it in memory while they train.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence

from jnn.train.preemption import PREEMPTED_EXIT_CODE


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a local coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_cpu_devices(xla_flags: str, devices: int) -> str:
    """`xla_flags` (an `XLA_FLAGS` value) with its fake CPU device count set to `devices`, every other
    flag kept (a user's `--xla_dump_to`, a test's optimisation level)."""
    kept = [f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count")]
    return " ".join(kept + [f"--xla_force_host_platform_device_count={devices}"])


def launch_local(argv: Sequence[str], num_processes: int, *, devices_per_process: int | None = None,
                 timeout_s: float | None = None, env: Mapping[str, str] | None = None,
                 poll_s: float = 0.05) -> int:
    """Runs `argv` as `num_processes` processes of one JAX run on this machine, and owns them.

    Each child gets `JNN_COORDINATOR=127.0.0.1:<free port>`, `JNN_NUM_PROCESSES` and
    `JNN_PROCESS_ID` (read by `initialize`) and, with `devices_per_process`, its own fake CPU
    device count. When a child fails, the others are killed (they would otherwise wait for, or be
    aborted by, the dead peer); on `timeout_s` all are killed.

    Args:
      argv: the command, e.g. `[sys.executable, "train.py", "--steps", "10"]`.
      num_processes: how many processes.
      devices_per_process: fake CPU devices per process (sets their count in XLA_FLAGS, keeping the
        other flags, and JAX_PLATFORMS=cpu).
      timeout_s: wall-clock limit for the whole run.
      env: extra environment variables for the children.
      poll_s: how often to check the children.

    SIGTERM, SIGUSR1 and SIGINT sent to this process are forwarded to every child (a scheduler
    signals the launcher): each saves at the same step and exits with `PREEMPTED_EXIT_CODE`.

    Returns:
      0 if every child exited 0; `PREEMPTED_EXIT_CODE` if they stopped on a signal; else the first
      other non-zero exit code (negative: killed by signal), or 124 on timeout.
    """
    base = dict(os.environ, **(env or {}))
    base["JNN_COORDINATOR"] = f"127.0.0.1:{free_port()}"
    base["JNN_NUM_PROCESSES"] = str(num_processes)
    if devices_per_process is not None:
        base["XLA_FLAGS"] = with_cpu_devices(base.get("XLA_FLAGS", ""), devices_per_process)
        base["JAX_PLATFORMS"] = "cpu"
    children: list[subprocess.Popen] = []

    def forward(signum, frame):  # a scheduler signals the launcher: every child saves and stops
        for child in children:
            if child.poll() is None:
                os.kill(child.pid, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        for i in range(num_processes):
            children.append(subprocess.Popen(list(argv), env=dict(base, JNN_PROCESS_ID=str(i)),
                                             start_new_session=True))
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            codes = [c.poll() for c in children]
            failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0, PREEMPTED_EXIT_CODE)]
            if failed:
                i, code = failed[0]
                how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
                running = sum(c is None for c in codes)
                print(f"launch_local: process {i} of {num_processes} {how}; stopping the other "
                      f"{running} running process(es).", file=sys.stderr, flush=True)
                return code
            if all(code is not None for code in codes):  # 0, or preempted together (all saved one step)
                return max(codes)
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch_local: timed out after {timeout_s} s", file=sys.stderr)
                return 124
            time.sleep(poll_s)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for child in children:  # only our own children, by pid (each leads its own session)
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                child.wait()
