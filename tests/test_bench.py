"""The benchmark harness (`python -m benchmarks`, `jnn bench`): its code paths, not its figures.

The harness runs every workload in a fresh process; these tests run it the same way, at the
smallest sizes (one round of blocks of one or two steps), with XLA's backend optimisations off so
that compiling is quick: the numbers mean nothing, the files and their fields are what is checked.
"""
import ast
import graphlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import common, harness, loss_check, report, workloads
from jnn import cli

ROOT = Path(__file__).resolve().parent.parent
TORCH = harness.torch_installed()


def run_harness(tmp_path, *args: str, plot: bool = True) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--rounds", "1", "--block-seconds", "0.001",
                           "--out", str(tmp_path), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("bench-*.json")
    assert json_path.with_suffix(".md").is_file()
    # The plot shows ratios: a run with none (the GPU suite without its PyTorch peers) says so instead.
    assert json_path.with_suffix(".png").is_file() if plot else "no ratios to plot" in proc.stdout
    result = json.loads(json_path.read_text())
    result["_markdown"] = json_path.with_suffix(".md").read_text()
    result["_stdout"] = proc.stdout
    return result


def test_cpu_workload_writes_json_markdown_and_plot(tmp_path):
    result = run_harness(tmp_path, "--workloads", "W1", "--quick", "--no-torch")
    assert result["suite"] == "cpu-quick"
    machine = result["environment"]["machine"]
    assert machine["load_average_start"] and machine["load_average_end"] and machine["cpu_count"]
    assert result["environment"]["versions"]["jax"]
    w1 = result["workloads"]["W1"]
    assert set(w1["candidates"]) == {"jnn", "jnn_jax_jit", "raw", "flax"}
    for c in w1["candidates"].values():
        assert c["wall_ms"]["median"] > 0 and c["first_step_s"] > 0 and c["items_per_s"] > 0
        assert c["flops_per_step"] > 0 and c["flops_per_s"] > 0
    assert set(w1["first_step_losses"]) == {"jnn", "jnn_jax_jit", "raw", "flax"}
    assert {"jnn / raw", "jnn / flax"} <= set(w1["ratios"])
    assert w1["compile_ratio"]["jnn / raw"] > 0 and w1["max_rss_mb"] > 0
    assert w1["matmul"]["float32"]["flops_per_s"] > 0 and result["peak_flops_per_s"]["float32"] > 0
    assert {t["ratio"] for t in result["targets"]} >= {"jnn / raw", "compile jnn / raw"}
    assert "PyTorch peers: skipped (--no-torch)" in result["skipped"]
    md = result["_markdown"]
    assert "## Summary" in md and "| W1 (" in md and "| jnn / raw |" in md and "load average" in md


@pytest.mark.slow
def test_gpu_suite_code_paths_at_tiny_size_on_cpu(tmp_path):
    result = run_harness(tmp_path, "--suite", "gpu", "--tiny", plot=TORCH)
    assert result["suite"] == "gpu-tiny" and result["backend"] == "cpu"
    g1, g2, g3 = (result["workloads"][k] for k in ("G1", "G2", "G3"))
    for w in (g1, g2):
        assert w["precision"] == "mixed_bf16" and w["candidates"]["jnn"]["items_per_s"] > 0
        if TORCH:  # the eager peer (no torch.compile at --tiny), bf16 autocast, in its own process
            assert w["candidates"]["torch_eager"]["max_rss_mb"] > 0
            assert "jnn / torch_eager" in w["ratios"]
    assert g1["unit"] == "tokens" and g1["candidates"]["jnn"]["model_flops_per_s"] > 0
    assert g3["exit_codes"] == [0] and g3["wall_s"]["median"] > 0
    assert "not in the dense bf16 peak table" in result["_markdown"]  # a CPU has no bf16 peak entry
    if not TORCH:
        assert any("PyTorch not installed" in s for s in result["skipped"])


def test_loss_check_fails_loudly_on_a_peer_that_computes_another_loss():
    import jax
    import optax

    w = workloads.cpu_workloads()["W1"]
    cands = harness.build_jax_candidates(w, peers=("jnn", "raw"), full=False)
    model, raw = w.model(), cands["raw"]
    # The same hand-written step with a label-smoothed loss: another computation, same parameters.
    def smoothed(logits, y):
        return optax.softmax_cross_entropy(logits, optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), 0.1))

    cands["raw"] = harness.JaxCandidate(workloads.make_raw_step(model, optax.adam(workloads.LR), loss=smoothed),
                                        raw.carry, raw.batches)
    with pytest.raises(loss_check.LossMismatchError, match=r"raw computes .* fix the peer"):
        harness.first_steps(cands)
    loss_check.check_same_loss({"jnn": 2.3, "raw": 2.3 * (1 + loss_check.LOSS_RTOL / 2)})  # within tolerance


def benchmark_imports(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the `benchmarks` package at `root` that it imports, wherever in the
    module the import stands (a function-level import closes a cycle as surely as a top-level one)."""
    paths = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in root.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `from . import x` in package P is `from P import x`
                    parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets |= {base} | {f"{base}.{a.name}" for a in node.names}
        # Importing `benchmarks.a.b` runs `benchmarks/__init__.py` and `benchmarks/a/__init__.py` first.
        graph[name] = {t.rsplit(".", k)[0] for t in targets for k in range(t.count(".") + 1)} & paths.keys() - {name}
    return graph


def import_cycle(root: Path) -> list[str] | None:
    """A cycle of imports among the modules of the `benchmarks` package at `root`, or None."""
    try:
        graphlib.TopologicalSorter(benchmark_imports(root)).prepare()
    except graphlib.CycleError as err:
        return err.args[1]
    return None


def test_benchmarks_have_no_import_cycle(tmp_path):
    assert import_cycle(ROOT / "benchmarks") is None
    # The checker finds the cycle issue 24 reported (W2's module imported the harness, which runs W2),
    # planted again in a copy.
    copy = tmp_path / "benchmarks"
    shutil.copytree(ROOT / "benchmarks", copy, ignore=shutil.ignore_patterns("results", "__pycache__"))
    with open(copy / "digits_tta.py", "a") as f:
        f.write("\n\ndef _planted():\n    from benchmarks.harness import JaxCandidate  # noqa: F401\n")
    assert set(import_cycle(copy)) == {"benchmarks.digits_tta", "benchmarks.harness"}


def path_hacks(root: Path) -> list[str]:
    """Imports of a `benchmarks` module by its bare name (`import common`) and edits of `sys.path`,
    at `root`: what a script run as a file needs, and a module run with `python -m` must not use."""
    names = {p.stem for p in root.rglob("*.py")} - {"__init__", "__main__"}
    found = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module.split(".")[0] in names:
                found.append(f"{where}: from {node.module} import ...")
            elif isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys":
                found.append(f"{where}: sys.path")
    return found


def test_benchmarks_run_as_modules_of_the_package(tmp_path):
    """Studies run as `python -m benchmarks.studies.<name>` and import `from benchmarks import common`."""
    assert path_hacks(ROOT / "benchmarks") == []
    copy = tmp_path / "benchmarks"
    shutil.copytree(ROOT / "benchmarks", copy, ignore=shutil.ignore_patterns("results", "__pycache__"))
    with open(copy / "studies" / "step.py", "a") as f:  # what step.py did before issue 24
        f.write("\nsys.path.insert(0, str(Path(__file__).resolve().parent))\nimport common  # noqa: E402\n")
    assert set(path_hacks(copy)) == {"benchmarks/studies/step.py: sys.path",
                                     "benchmarks/studies/step.py: import common"}


def test_the_readme_headline_table_is_generated_from_the_committed_results():
    """benchmarks/README.md's headline table is `python -m benchmarks.report --write-readme`'s output,
    not typed: a new result in benchmarks/results/ (or a new target) fails here until it is rerun."""
    readme = report.README.read_text()
    assert readme.count(report.HEADLINE_START) == 1 and readme.count(report.HEADLINE_END) == 1
    assert report.readme_with_headline(readme, report.headline_markdown(common.RESULTS)) == readme, \
        "the headline table is stale or edited by hand: run `python -m benchmarks.report --write-readme`"
    assert "| W1 | `jnn / raw`:" in readme and "| G1 | `mfu`:" in readme
    row = "| W1 | `jnn / raw`: jnn step vs the same step in raw JAX + optax | "
    edited = readme.replace(row + "1.", row + "0.")  # a figure typed over
    assert edited != readme and report.readme_with_headline(edited, report.headline_markdown()) != edited


def test_headline_takes_each_workloads_newest_full_run(tmp_path):
    full = json.loads((common.RESULTS / "bench-cpu-2026-12-05.json").read_text())

    def write(name, suite, date, workloads):
        result = dict(full, suite=suite, environment=dict(full["environment"], date=date),
                      workloads={k: full["workloads"][k] for k in workloads})
        (tmp_path / f"{name}.json").write_text(json.dumps(result))

    write("bench-cpu-2026-11-30", "cpu", "2026-11-30T13:42:32", ["W1", "W2", "W3"])
    write("bench-cpu-quick-2027-01-01", "cpu-quick", "2027-01-01T00:00:00", ["W1", "W2", "W3"])  # 3 rounds
    write("bench-cpu-2027-01-02", "cpu", "2027-01-02T00:00:00", ["W3"])  # a newer full run of W3 alone
    write("bench-gpu-tiny-2027-01-03", "gpu-tiny", "2027-01-03T00:00:00", [])  # toy sizes: never
    full["workloads"]["W2"] = {"error": "worker failed"}
    write("bench-cpu-2027-01-04", "cpu", "2027-01-04T00:00:00", ["W2"])  # an error measures nothing
    newest = report.newest_results(tmp_path, "cpu")
    assert {k: p.stem for k, (p, _) in newest.items()} == {
        "W1": "bench-cpu-2026-11-30", "W2": "bench-cpu-2026-11-30", "W3": "bench-cpu-2027-01-02"}
    (tmp_path / "bench-cpu-2026-11-30.json").unlink()  # no full run of W1 left: the quick one stands in
    assert report.newest_results(tmp_path, "cpu")["W1"][0].stem == "bench-cpu-quick-2027-01-01"
    assert report.newest_results(tmp_path, "gpu") == {}


def test_jnn_bench_forwards_to_the_harness(capfd):
    assert cli.main(["bench", "--help"]) == 0
    assert "usage: python -m benchmarks" in capfd.readouterr().out


def test_worker_timeout_kills_the_worker_and_its_children(tmp_path):
    """`--worker-timeout`: a hung workload (and the peer process it started) is killed, not waited for."""
    from benchmarks.__main__ import run_process

    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    code, err, usage = run_process([sys.executable, "-c", script], timeout=8)  # time to start both
    assert code == -9 and "worker timeout of 8 s" in err and usage["seconds"] < 60
    # The peer got the same SIGKILL; nobody waits for it, so it dies when the kernel next runs it
    # (on 2 busy cores, not always by the time its worker has been reaped: CI saw it still alive).
    peer, deadline = int(pid_file.read_text()), time.monotonic() + 10
    while _alive(peer) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(peer), "the peer process outlived its worker by 10 s"


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except FileNotFoundError:
        return False


def test_a_terminated_harness_takes_its_worker_down(tmp_path):
    """`timeout` sends the harness SIGTERM: the worker, in its own process group, must not outlive it."""
    import signal
    import time

    pid_file = tmp_path / "worker.pid"
    worker = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    harness_script = ("import signal, sys; from benchmarks.__main__ import run_process; "
                      "signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); "
                      f"run_process([sys.executable, '-c', {worker!r}])")
    proc = subprocess.Popen([sys.executable, "-c", harness_script], cwd=ROOT)
    deadline = time.time() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and proc.poll() is None, "the worker never started"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    worker_pid = int(pid_file.read_text())
    for _ in range(50):
        if not _alive(worker_pid):
            break
        time.sleep(0.1)
    assert not _alive(worker_pid), "the worker outlived the terminated harness"


def test_guard_benchmark_writes_its_four_candidates_and_ratios(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.studies.guard", "--workloads", "W1", "--rounds", "1",
                           "--block-seconds", "0.001", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("guard-*.json")
    result = json.loads(json_path.read_text())
    w1 = result["workloads"]["W1"]
    assert set(w1["wall_ms"]) == {"apply", "skip", "apply_norm", "skip_norm"}
    assert all(v["median"] > 0 for v in w1["wall_ms"].values())
    assert set(w1["ratios"]) == {"skip / apply", "skip_norm / apply_norm", "apply_norm / apply"}
    assert result["environment"]["machine"]["load_average_end"]
    assert "| W1 tiny MLP" in json_path.with_suffix(".md").read_text()


def test_guard_variants_benchmark_writes_every_variant(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.studies.guard_variants", "--rounds", "1",
                           "--block-seconds", "0.001", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = tmp_path.glob("guard-variants-*.json")
    w = json.loads(json_path.read_text())["workload"]
    from benchmarks.studies.guard_variants import VARIANTS

    assert list(w["wall_ms"]) == list(VARIANTS) and all(v["median"] > 0 for v in w["wall_ms"].values())
    assert set(w["ratios"]) == {f"{v} / apply" for v in VARIANTS[1:]}


def test_train_default_against_runs_that_commits_jnn(tmp_path):
    """`train_default --against COMMIT` compares this tree with the commit's code, not with itself:
    its row imports jnn from a worktree of the commit, ahead of the editable install."""
    from benchmarks.studies import train_default

    root = Path(__file__).resolve().parents[1]
    variants = train_default.cli_variants(str(tmp_path), against="HEAD")
    try:
        _, extra = variants[train_default.warm_row("HEAD")]
        probe = subprocess.run([sys.executable, "-c", "import jnn; print(jnn.__file__)"], capture_output=True,
                               text=True, env={**os.environ, **extra}, cwd=tmp_path, check=True)
        assert probe.stdout.strip() == str(tmp_path / "against" / "jnn" / "__init__.py"), probe.stdout
        assert extra["JNN_COMPILATION_CACHE"] != variants["jnn train, compile cache warm"][1]["JNN_COMPILATION_CACHE"]
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tmp_path / "against")], cwd=root,
                       capture_output=True)
