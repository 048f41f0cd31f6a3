"""Which launcher started this process, and what it says about the run: `detect()`.

A cluster scheduler starts one process per task and tells each, in environment variables, how
many there are and which one it is. `detect` reads them (the rules JAX's own cluster detection
uses, in `jax/_src/clusters/`, made explicit and explained):

| launcher | what says "a multi-process run" | process id / count / local id | coordinator |
|---|---|---|---|
| explicit | `JNN_COORDINATOR`, `JNN_NUM_PROCESSES`, `JNN_PROCESS_ID` (or `JAX_*`) | as given | as given |
| SLURM `srun` | `SLURM_JOB_ID` and a job step (`SLURM_STEP_NODELIST`) | `SLURM_PROCID` / `SLURM_NTASKS` / `SLURM_LOCALID` | first host of the step's node list, port from the job id (as JAX) |
| Open MPI `mpirun` | `OMPI_COMM_WORLD_SIZE` | `OMPI_COMM_WORLD_RANK` / `_SIZE` / `_LOCAL_RANK` | `OMPI_MCA_orte_hnp_uri`'s host (Open MPI 4, as JAX), else `JNN_COORDINATOR` |
| Kubernetes Indexed Job | `JOB_COMPLETION_INDEX` with `JNN_NUM_PROCESSES` | the completion index | `JNN_COORDINATOR` (pod 0's stable name) |

Explicit variables win over a scheduler's. A SLURM allocation without a job step (the batch
script itself, or an `salloc` shell) is one process: `jnn` says so, since it usually means `srun`
was forgotten. Variables that disagree raise a `ValueError` naming them.

Devices: with several tasks on one node, each process takes the accelerator of its local id (one
GPU per task), unless the scheduler already restricted what each task sees (`CUDA_VISIBLE_DEVICES`
set per task, e.g. `--gpus-per-task`); with one task per node, the process takes all its node's
accelerators. (JAX's own default takes device `local id` even with one task per node, which
leaves all but one GPU idle.)
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

JNN_OPT_OUT = "JNN_CLUSTER"  # "off": ignore every scheduler's variables (explicit JNN_* still work)


@dataclasses.dataclass(frozen=True)
class Launch:
    """What the environment says about the run this process belongs to.

    Attributes:
      launcher: "explicit", "slurm", "openmpi" or "kubernetes".
      coordinator_address: "host:port" where process 0 listens.
      num_processes: processes in the run.
      process_id: this process's index.
      local_device_ids: accelerators this process takes (None: all it sees).
      found: the variables read, for messages.
    """

    launcher: str
    coordinator_address: str | None
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None
    found: str

    def describe(self) -> str:
        return (f"{self.launcher} launch: process {self.process_id} of {self.num_processes}, coordinator "
                f"{self.coordinator_address}" + (f", local devices {list(self.local_device_ids)}"
                                                 if self.local_device_ids is not None else "") + f" ({self.found})")


@dataclasses.dataclass(frozen=True)
class NotJoined:
    """An environment that looks like a cluster job but is one process here, and why."""

    reason: str


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"cluster launch: {name}={env[name]!r}; expected an integer.") from None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'n1,n2' -> 'n1', 'gpu[003-010,12]' -> 'gpu003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cluster launch: SLURM_STEP_NODELIST={nodelist!r} is not a node list.")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[,-]", ranges)[0] if ranges else "")


def tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """Tasks on node `node_id` from SLURM's '2(x3),1' format, or None if unreadable."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


def _devices(local_id: int, tasks_here: int | None, env: Mapping[str, str]) -> tuple[int, ...] | None:
    if any(env.get(v) for v in ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES")):
        return None  # the scheduler already gave each task its devices
    return (local_id,) if tasks_here is None or tasks_here > 1 else None


def _check(launcher: str, count: int, index: int, found: str) -> None:
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"cluster launch ({launcher}): process {index} of {count} ({found}); expected a process "
                         f"id in [0, {count}). Fix: launch through the scheduler (srun / mpirun) rather than setting "
                         f"these variables by hand, or set JNN_CLUSTER=off to ignore them.")


def _port(env: Mapping[str, str], job_id: int) -> str:
    """JAX's rule: JAX_COORDINATOR_PORT, else a port in [61440, 65535] derived from the job id."""
    return env.get("JNN_COORDINATOR_PORT") or env.get("JAX_COORDINATOR_PORT") or str(job_id % 4096 + 61440)


def _slurm(env: Mapping[str, str]) -> Launch | NotJoined:
    ntasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1"
    if "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env:
        return NotJoined(f"a SLURM allocation (SLURM_JOB_ID={env['SLURM_JOB_ID']}, SLURM_NTASKS={ntasks}) but no "
                         f"job step (SLURM_STEP_NODELIST unset: the batch script or an salloc shell, not srun); "
                         f"training as one process. Fix: launch one process per task with `srun jnn train ...`")
    if env.get("SLURM_STEP_NUM_TASKS") and env.get("SLURM_NTASKS") and \
            env["SLURM_STEP_NUM_TASKS"] != env["SLURM_NTASKS"]:
        raise ValueError(f"cluster launch (slurm): SLURM_STEP_NUM_TASKS={env['SLURM_STEP_NUM_TASKS']} but "
                         f"SLURM_NTASKS={env['SLURM_NTASKS']}; expected the job step's task count in both. Fix: "
                         f"launch with `srun` (which sets both for the step), or set JNN_CLUSTER=off.")
    count, index = _int(env, "SLURM_STEP_NUM_TASKS" if env.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"), \
        _int(env, "SLURM_PROCID")
    found = f"SLURM_JOB_ID={env['SLURM_JOB_ID']}, SLURM_PROCID={index}, SLURM_NTASKS={count}"
    _check("slurm", count, index, found)
    if count == 1:
        return NotJoined(f"a SLURM job step with 1 task ({found}); training as one process")
    local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    here = tasks_on_node(per_node, _int(env, "SLURM_NODEID") if "SLURM_NODEID" in env else 0) if per_node else None
    address = env.get("JNN_COORDINATOR") or f"{first_host(env['SLURM_STEP_NODELIST'])}:" \
                                             f"{_port(env, _int(env, 'SLURM_JOB_ID'))}"
    return Launch("slurm", address, count, index, _devices(local, here, env), found)


def _openmpi(env: Mapping[str, str]) -> Launch | NotJoined:
    count, index = _int(env, "OMPI_COMM_WORLD_SIZE"), _int(env, "OMPI_COMM_WORLD_RANK")
    found = f"OMPI_COMM_WORLD_RANK={index}, OMPI_COMM_WORLD_SIZE={count}"
    _check("openmpi", count, index, found)
    if count == 1:
        return NotJoined(f"an Open MPI launch with 1 process ({found}); training as one process")
    local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK") if "OMPI_COMM_WORLD_LOCAL_RANK" in env else 0
    here = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE") if "OMPI_COMM_WORLD_LOCAL_SIZE" in env else None
    address = env.get("JNN_COORDINATOR")
    uri = env.get("OMPI_MCA_orte_hnp_uri")
    if address is None and uri:  # Open MPI 4: "<jobid>.0;tcp://<ip>[,<ip>...]:<port>"
        host = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
        if host is None:
            raise ValueError(f"cluster launch (openmpi): cannot read the launcher's host from OMPI_MCA_orte_hnp_uri="
                             f"{uri!r}. Fix: set JNN_COORDINATOR=<rank 0's host>:<port>.")
        address = f"{next(h for h in host.groups() if h)}:{_port(env, int(uri.split('.', 1)[0]) // 4096)}"
    if address is None:
        raise ValueError(f"cluster launch (openmpi): {found}, but no coordinator: Open MPI 5 does not publish its "
                         f"launcher's address (OMPI_MCA_orte_hnp_uri). Fix: mpirun -x JNN_COORDINATOR=<rank 0's "
                         f"host>:<free port> ..., or set JNN_CLUSTER=off to run each rank alone.")
    return Launch("openmpi", address, count, index, _devices(local, here, env), found)


def _explicit(env: Mapping[str, str]) -> Launch | None:
    names = {"coordinator": ("JNN_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
             "count": ("JNN_NUM_PROCESSES", "JAX_NUM_PROCESSES"), "index": ("JNN_PROCESS_ID", "JAX_PROCESS_ID")}
    got = {k: next((env[v] for v in vs if env.get(v)), None) for k, vs in names.items()}
    launcher, found = "explicit", ""
    if got["index"] is None and env.get("JOB_COMPLETION_INDEX") and got["count"] is not None:
        got["index"], launcher = env["JOB_COMPLETION_INDEX"], "kubernetes"  # an Indexed Job's pod
        found = f"JOB_COMPLETION_INDEX={env['JOB_COMPLETION_INDEX']}, "
    if all(v is None for v in got.values()):
        return None
    missing = [names[k][0] for k, v in got.items() if v is None]
    if missing:
        raise ValueError(f"cluster launch: {', '.join(f'{names[k][0]}={v}' for k, v in got.items() if v)} but "
                         f"{missing} unset; expected all three. Fix: set JNN_COORDINATOR=host:port, "
                         f"JNN_NUM_PROCESSES and JNN_PROCESS_ID in every process.")
    try:
        count, index = int(got["count"]), int(got["index"])
    except ValueError:
        raise ValueError(f"cluster launch: process count {got['count']!r} and id {got['index']!r}; expected "
                         f"integers.") from None
    found += f"JNN_PROCESS_ID={index}, JNN_NUM_PROCESSES={count}, JNN_COORDINATOR={got['coordinator']}"
    _check(launcher, count, index, found)
    return Launch(launcher, got["coordinator"], count, index, None, found)


def detect(environ: Mapping[str, str] | None = None) -> Launch | NotJoined | None:
    """The multi-process run the environment describes (a `Launch`), a cluster job that is one
    process here (`NotJoined`, with the reason), or None (nothing of the kind).

    Raises:
      ValueError: variables that are incomplete or disagree, naming them.
    """
    env = os.environ if environ is None else environ
    explicit = _explicit(env)
    if explicit is not None:
        return explicit
    if env.get(JNN_OPT_OUT, "").lower() in ("off", "0", "false", "no"):
        return None
    if env.get("SLURM_JOB_ID"):
        return _slurm(env)
    if env.get("OMPI_COMM_WORLD_SIZE"):
        return _openmpi(env)
    return None
