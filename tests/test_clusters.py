"""Cluster launches: SLURM, Open MPI and Kubernetes environments detected (and explained), a
simulated SLURM / Open MPI job of 2 tasks on localhost trains exactly like `jnn train --processes 2`,
the examples' sbatch script and Indexed Job produce the environment jnn reads, and --requeue."""
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest
import yaml

from jnn.parallel import _clusters as clusters
from tests.test_preemption import final_state, jnn_train, _env, _records

ROOT = Path(__file__).resolve().parents[1]


def _slurm(procid, ntasks=2, **extra):
    return {"SLURM_JOB_ID": "4321", "SLURM_STEP_NODELIST": "node[07-08]", "SLURM_NTASKS": str(ntasks),
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(procid % 2), "SLURM_NODEID": str(procid // 2),
            "SLURM_STEP_TASKS_PER_NODE": "2(x2)", **extra}


def test_slurm_job_step():
    launch = clusters.detect(_slurm(3, ntasks=4))
    assert (launch.launcher, launch.process_id, launch.num_processes) == ("slurm", 3, 4)
    assert launch.coordinator_address == f"node07:{4321 % 4096 + 61440}"  # JAX's port rule
    assert launch.local_device_ids == (1,)  # 2 tasks on the node: one accelerator each
    one_per_node = clusters.detect(_slurm(1, ntasks=2, SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_LOCALID="0"))
    assert one_per_node.local_device_ids is None  # all of the node's accelerators (JAX would pin device 0)
    given = clusters.detect(_slurm(1, CUDA_VISIBLE_DEVICES="3"))
    assert given.local_device_ids is None  # SLURM already gave the task its GPU
    assert clusters.detect(_slurm(0, JNN_COORDINATOR_PORT="5555")).coordinator_address == "node07:5555"


def test_slurm_without_a_job_step_or_with_one_task_trains_alone_and_says_why():
    batch_script = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                    "SLURM_NODELIST": "node[1-2]"}
    found = clusters.detect(batch_script)
    assert isinstance(found, clusters.NotJoined) and "srun jnn train" in found.reason
    assert isinstance(clusters.detect(_slurm(0, ntasks=1)), clusters.NotJoined)
    done = subprocess.run([sys.executable, "-c", "from jnn import parallel; print(parallel.initialize())"],
                          env={**_env(ROOT / ".no-cache"), **batch_script}, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "False" and "no job step" in done.stderr and "srun jnn train" in done.stderr


@pytest.mark.parametrize("env, message", [
    (_slurm(2, ntasks=2), r"process 2 of 2.*expected a process id in \[0, 2\)"),
    (_slurm(0, SLURM_STEP_NUM_TASKS="4"), r"SLURM_STEP_NUM_TASKS=4 but SLURM_NTASKS=2"),
    (_slurm(0, SLURM_PROCID="zero"), r"SLURM_PROCID='zero'; expected an integer"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, r"Open MPI 5 does not publish.*JNN_COORDINATOR"),
    ({"JNN_COORDINATOR": "h:1", "JNN_NUM_PROCESSES": "2"}, r"\['JNN_PROCESS_ID'\] unset"),
])
def test_variables_that_disagree_are_refused_naming_them(env, message):
    with pytest.raises(ValueError, match=message):
        clusters.detect(env)


def test_open_mpi_kubernetes_explicit_and_opt_out():
    ompi = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}
    launch = clusters.detect(ompi)
    assert (launch.launcher, launch.process_id, launch.coordinator_address, launch.local_device_ids) == \
        ("openmpi", 1, f"10.96.0.1:{1531576320 // 4096 % 4096 + 61440}", (1,))
    pod = clusters.detect({"JOB_COMPLETION_INDEX": "2", "JNN_NUM_PROCESSES": "4", "JNN_COORDINATOR": "job-0.svc:1234"})
    assert (pod.launcher, pod.process_id, pod.num_processes) == ("kubernetes", 2, 4)
    explicit = clusters.detect({**_slurm(1), "JNN_COORDINATOR": "h:9", "JNN_NUM_PROCESSES": "3", "JNN_PROCESS_ID": "2"})
    assert (explicit.launcher, explicit.process_id) == ("explicit", 2)  # explicit variables win
    assert clusters.detect({**_slurm(1), "JNN_CLUSTER": "off"}) is None
    assert clusters.first_host("gpu[003-010,12],cpu1") == "gpu003" and clusters.tasks_on_node("2(x3),1", 3) == 1


# ---- the examples --------------------------------------------------------------------------------

SBATCH = ROOT / "examples" / "cluster" / "train.sbatch"
MANIFEST = ROOT / "examples" / "cluster" / "indexed-job.yaml"


def test_sbatch_example_is_valid_and_its_tasks_form_one_run():
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    options = dict(re.findall(r"^#SBATCH --([\w-]+)=?(\S*)", SBATCH.read_text(), flags=re.M))
    nodes, per_node = int(options["nodes"]), int(options["ntasks-per-node"])
    assert options["signal"].startswith("B:USR1@") and "requeue" in options
    assert "srun" in SBATCH.read_text() and "--requeue" in SBATCH.read_text()
    # what srun sets for each task of the step, as SLURM documents it
    found = []
    for task in range(nodes * per_node):
        env = {"SLURM_JOB_ID": "99", "SLURM_STEP_NODELIST": f"gpu[01-{nodes:02d}]", "SLURM_NTASKS": str(nodes * per_node),
               "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task % per_node), "SLURM_NODEID": str(task // per_node),
               "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})"}
        found.append(clusters.detect(env))
    assert [f.process_id for f in found] == list(range(nodes * per_node))
    assert {f.coordinator_address for f in found} == {f"gpu01:{99 % 4096 + 61440}"}
    assert [f.local_device_ids for f in found] == [(t % per_node,) for t in range(nodes * per_node)]


def test_kubernetes_example_is_valid_and_its_pods_form_one_run():
    service, job = yaml.safe_load_all(MANIFEST.read_text())
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert spec["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == [75]  # preempted: not a failure
    pod = spec["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert int(env["JNN_NUM_PROCESSES"]) == spec["completions"]
    host, port = env["JNN_COORDINATOR"].split(":")
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}" and pod["subdomain"] == service["metadata"]["name"]
    assert int(port) == service["spec"]["ports"][0]["port"]
    found = [clusters.detect({**env, "JOB_COMPLETION_INDEX": str(i)}) for i in range(spec["completions"])]
    assert [f.process_id for f in found] == list(range(spec["completions"]))
    assert "jnn train" in pod["containers"][0]["args"][0] and "--resume" in pod["containers"][0]["args"][0]


# ---- simulated launches on localhost -------------------------------------------------------------


def _free_derived_port(offset: int) -> int:
    """A job id whose JAX-derived coordinator port is free here."""
    for job_id in range(offset, offset + 4096):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", job_id % 4096 + 61440))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port in [61440, 65535]")


LAUNCH_STEPS = 60  # 3 evaluations and checkpoints: what the launches must agree on, in a third of 200's time


def _launch(run, cache, envs):
    """Starts one `jnn train` per task environment, as srun / mpirun do, and waits for all."""
    args = ["--debug", "--run-dir", str(run), "--set", f"train.steps={LAUNCH_STEPS}", "--set", "train.eval_every=20",
            "--no-progress"]
    procs = [subprocess.Popen([sys.executable, "-m", "jnn.cli", "train", *args], env={**_env(cache), **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for env in envs]
    outs = [p.communicate(timeout=300) for p in procs]
    return [p.returncode for p in procs], outs


@pytest.mark.slow
def test_slurm_and_open_mpi_launches_train_like_processes_2(tmp_path):
    cache = tmp_path / "xla"
    reference = tmp_path / "processes2"
    done = subprocess.run([sys.executable, "-m", "jnn.cli", "train", "--debug", "--run-dir", str(reference), "--set",
                           f"train.steps={LAUNCH_STEPS}", "--set", "train.eval_every=20", "--no-progress",
                           "--processes", "2"],
                          env=_env(cache), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    job = _free_derived_port(1000)
    slurm = [{"SLURM_JOB_ID": str(job), "SLURM_STEP_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_PROCID": str(i),
              "SLURM_LOCALID": str(i), "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "2"} for i in range(2)]
    hnp = _free_derived_port(2000) * 4096
    ompi = [{"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(i), "OMPI_COMM_WORLD_LOCAL_RANK": str(i),
             "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_MCA_orte_hnp_uri": f"{hnp}.0;tcp://127.0.0.1:40001"}
            for i in range(2)]
    for name, envs in (("slurm", slurm), ("openmpi", ompi)):
        run = tmp_path / name
        codes, outs = _launch(run, cache, envs)
        assert codes == [0, 0], [err[-2000:] for _, err in outs]
        assert f"{name} launch: process 0 of 2" in outs[0][1] and f"{name} launch: process 1 of 2" in outs[1][1]
        assert "training " in outs[0][0] and not [line for line in outs[1][0].splitlines()
                                                  if not line.startswith("[Gloo]")]  # process 0 reports the run
        chex.assert_trees_all_equal(final_state(run, LAUNCH_STEPS), final_state(reference, LAUNCH_STEPS))
        assert (run / "test_metrics.json").read_text() == (reference / "test_metrics.json").read_text()
        records = _records(run)
        assert len(records) == len(set(records)) and records == _records(reference)  # nothing written twice


@pytest.mark.slow
def test_requeue_under_slurm_after_a_preemption(tmp_path):
    """`jnn train --requeue` in a SLURM job: on SIGTERM it saves, then runs `scontrol requeue JOB`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(tmp_path / 'scontrol.log'))}\n")
    scontrol.chmod(0o755)
    env = {**_env(tmp_path / "xla"), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           **{k: v for k, v in _slurm(0, ntasks=1).items()}}
    proc = subprocess.Popen([sys.executable, "-m", "jnn.cli", "train", "--debug", "--run-dir", str(tmp_path / "run"),
                             "--set", "train.steps=100000", "--requeue", "--no-progress"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("training "):
            break
    import signal
    import time
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert "a SLURM job step with 1 task" in err and "scontrol requeue 4321`: done" in err
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4321"]
