"""One writer per directory: a run directory (or a checkpoint directory) is claimed by the process
that writes it, and a second writer is refused at once with the holder's host, pid and start time.

The claim is an OS lock (`fcntl.flock`) on `<dir>/.jnn-claim`, held as long as the writer runs. The
kernel drops it when the process ends in any way (exit, exception, SIGKILL, OOM kill), so a claim
left by a killed run never blocks `--resume`: there is nothing to detect as stale and no timeout to
tune. A lease with a heartbeat would need a clock and a grace period, and would either refuse a
legitimate resume or admit a second writer during that period. The file's text only describes the
holder, for the error message; the lock is the truth. On a network file system the lock is the
server's (NFSv4 locks expire with the lost client's lease, about 90 s); a file system without
locks (flock raises ENOLCK) is said once on stderr and the run goes on unguarded.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import os
import socket
import sys

CLAIM_FILE = ".jnn-claim"


class ClaimedError(ValueError):
    """The directory is being written by another running process (named in the message)."""


def _holder_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "another process (it has not written its name yet)"
    except OSError:
        return "another process"


def _refusal(directory: str, what: str, holder: str) -> ClaimedError:
    return ClaimedError(
        f"{what} {directory} is being written by {holder}; expected no other writer (two runs in one "
        f"directory duplicate its records and corrupt its checkpoints). Fix: wait for that run to end (or stop "
        f"it), then `jnn train --resume {directory}`; or use another directory.")


def probe(directory: str, what: str = "run directory") -> None:
    """Refuses a directory another live process has claimed (without claiming it, or creating anything)."""
    path = os.path.join(directory, CLAIM_FILE)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # no claim file: nobody has ever written here
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _refusal(directory, what, _holder_text(path)) from None
    except OSError:
        return
    finally:
        os.close(fd)  # also releases the shared lock


class Claim:
    """This process's claim on `directory`, held until `release()` (or the process ends); also a
    context manager (`with Claim(run_dir): ...`)."""

    def __init__(self, directory: str | os.PathLike, what: str = "run directory", command: str = ""):
        self.directory = os.path.abspath(os.fspath(directory))
        self.what, self.command = what, command
        self._fd: int | None = None

    def acquire(self) -> "Claim":
        """Claims the directory (creating it).

        Raises:
          ClaimedError: another live process holds it.
        """
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, CLAIM_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refusal(self.directory, self.what, _holder_text(path)) from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"jnn: warning: the file system of {self.directory} has no locks ({err.strerror}); a second "
                  f"writer cannot be detected there.", file=sys.stderr)
            return self
        started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        text = f"host {socket.gethostname()}, pid {os.getpid()}, started {started}"
        os.ftruncate(fd, 0)
        os.write(fd, (text + (f" ({self.command})" if self.command else "") + "\n").encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def __enter__(self) -> "Claim":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
