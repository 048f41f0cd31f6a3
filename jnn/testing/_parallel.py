"""`check_parallel`: one call that proves a model trains the same on every parallel path.

Single-device `jax.jit` training is the reference. Each path trains the same initial state on the
same global batches for a few steps and is compared with it, parameters and model state (batch
statistics) alike:

- "vmap": two identical members of an ensemble (`jax.vmap` over a stacked state);
- "data_parallel": sharded `jax.jit` (`jnn.parallel.data_parallel`), state replicated;
- "fsdp": the same with the state sharded over the devices;
- "pmap": `jnn.parallel.pmap_train_step`;
- "shard_map": `jnn.parallel.shard_map_train_step`.

Dropout, honestly: vmap and sharded jit draw the single-device masks, so they are compared with
dropout on. pmap and shard_map draw one mask per device for its shard by design (jnn folds the
device index into the key), so they cannot equal single-device training bit for bit with dropout
on. For a model that draws random numbers in training they are compared twice: with dropout off
(every dropout layer at rate 0, on both sides) against single-device training, and with dropout
on against the same per-device computation run on one device (`jax.vmap` over the shards with the
same axis name: the same keys, masks and collectives). The report names the reference of each row.

On a machine with fewer devices than asked for (a laptop's one CPU, or a JAX already started
with one device), the comparison runs in a subprocess with that many fake CPU devices.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import sys
import time
from typing import Any

import jax
import numpy as np

from jnn.testing._case import CHECK_TX, batch_size, compiling_fast, take
from jnn.testing._randomness import random_draws
from jnn.testing._report import Failure, ModelCheckError, compare_trees

PATHS = ("vmap", "data_parallel", "fsdp", "pmap", "shard_map")
# The same float32 training on another path differs only in the order of the cross-device sums:
# a few ulps after a few steps (tests/test_parallel.py measures ~4e-7 on O(1) parameters).
PARALLEL_RTOL, PARALLEL_ATOL = 1e-5, 1e-6
_CONFIG = ("jax_numpy_rank_promotion", "jax_enable_x64", "jax_default_matmul_precision")


@dataclasses.dataclass(frozen=True)
class PathResult:
    """One path compared with its reference: the largest differences and where the worst one is."""

    path: str
    reference: str
    max_abs: float
    max_rel: float
    passed: bool
    worst: str


@dataclasses.dataclass(frozen=True)
class ParallelReport:
    """What `check_parallel` compared, and how far each path was from its reference."""

    devices: int
    steps: int
    rtol: float
    atol: float
    randomness: str
    subprocess: bool
    seconds: float
    results: tuple[PathResult, ...]

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def __str__(self) -> str:
        head = (f"check_parallel: {self.devices} devices{' (fake CPU devices, in a subprocess)' if self.subprocess else ''}"
                f", {self.steps} steps, tolerance rtol {self.rtol:g} atol {self.atol:g}; {self.randomness}; "
                f"{self.seconds:.1f} s")
        width = max(len(r.path) for r in self.results)
        ref = max(len(r.reference) for r in self.results)
        rows = [f"  {r.path:<{width}}  vs {r.reference:<{ref}}  max |diff| {r.max_abs:9.3g}  "
                f"max rel {r.max_rel:9.3g}  {'ok' if r.passed else 'DIVERGES at ' + r.worst}" for r in self.results]
        return "\n".join([head, *rows])


def _variables(state) -> dict:
    return jax.device_get({"params": state.params, "model_state": state.model_state})


def _distance(got, want) -> tuple[float, float]:
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    diffs = [float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)))) for g, w in pairs if np.size(w)]
    scale = max([float(np.max(np.abs(np.asarray(w, np.float64)))) for _, w in pairs if np.size(w)] + [1e-30])
    return max(diffs, default=0.0), max(diffs, default=0.0) / scale


def _without_dropout(state):
    return state.replace(model=dataclasses.replace(state.model, dropout=False))


def compare(model: Any, inputs: Any, labels: Any, *, loss_fn: Any, devices: int, steps: int, paths, rtol: float,
            atol: float, precision: Any, train_kwarg: Any) -> ParallelReport:
    """Runs the comparison in this process (it has at least `devices` devices)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from jnn import parallel  # noqa: PLC0415
    from jnn.train.state import create_train_state  # noqa: PLC0415
    from jnn.train.step import make_train_step  # noqa: PLC0415

    start = time.perf_counter()
    size = batch_size(inputs, "check_parallel")
    state0 = create_train_state(model, CHECK_TX, take(inputs, slice(0, 1)), 0, precision=precision,
                                train_kwarg=train_kwarg)
    host = jax.device_get(state0.replace(rng=jax.random.key_data(state0.key)))
    impl = jax.random.key_impl(state0.key)

    def fresh(dropout: bool = True):
        state = jax.tree.map(np.array, host)
        state = state.replace(rng=jax.random.wrap_key_data(jnp.asarray(state.rng), impl=impl))
        return state if dropout else _without_dropout(state)

    batches = []
    for i in range(steps):
        perm = np.random.default_rng(i).permutation(size)
        batches.append({"inputs": take(inputs, perm), "labels": take(labels, perm)})
    draws = random_draws(lambda p, s, x, r: state0.model.apply(p, s, x, train=True, rng=r)[0],
                         (state0.params, state0.model_state, take(inputs, slice(0, 1)), jax.random.key(0)), 3)
    random = any(d.keyed for d in draws)

    def single(dropout: bool = True):
        step, state = jax.jit(make_train_step(loss_fn)), fresh(dropout)
        for batch in batches:
            state, _ = step(state, batch)
        return _variables(state)

    def per_device_on_one(axis: str):
        """pmap's / shard_map's per-device computation, run on one device: vmap over the shards."""
        step = jax.jit(jax.vmap(make_train_step(loss_fn, axis_name=axis), in_axes=(None, 0), axis_name=axis))
        state = fresh()
        for batch in batches:
            shards = jax.tree.map(lambda x: x.reshape(devices, size // devices, *x.shape[1:]), batch)
            new, _ = step(state, shards)
            state = jax.tree.map(lambda x: x[0], new)
        return _variables(state)

    mesh = parallel.make_mesh(data=devices)
    devs = list(mesh.devices.flat)

    def run(path: str, dropout: bool = True):
        if path == "vmap":
            stacked = jax.tree.map(lambda x: np.stack([x, x]), host)
            stacked = stacked.replace(rng=jax.random.wrap_key_data(jnp.asarray(stacked.rng), impl=impl))
            step = jax.jit(jax.vmap(make_train_step(loss_fn), in_axes=(0, None)))
            for batch in batches:
                stacked, _ = step(stacked, batch)
            members = [_variables(jax.tree.map(lambda x, i=i: x[i], stacked)) for i in range(2)]
            return members
        if path in ("data_parallel", "fsdp"):
            dp = parallel.data_parallel(make_train_step(loss_fn), mesh, fsdp=path == "fsdp")
            state = dp.shard_state(fresh(dropout))
            for batch in batches:
                state, _ = dp(state, dp.shard_batch(batch))
            return [_variables(state)]
        if path == "pmap":
            pm = parallel.pmap_train_step(make_train_step(loss_fn, axis_name="batch"), devices=devs)
            state = pm.replicate(fresh(dropout))
            for batch in batches:
                state, _ = pm(state, pm.shard_batch(batch))
            return [_variables(parallel.pmap_unreplicate(state))]
        sm = parallel.shard_map_train_step(make_train_step(loss_fn, axis_name="data"), mesh)
        state = sm.shard_state(fresh(dropout))
        for batch in batches:
            state, _ = sm(state, sm.shard_batch(batch))
        return [_variables(state)]

    reference = single()
    results = []

    def add(path: str, what: str, got: list, want):
        worst_abs, worst_rel, where, passed = 0.0, 0.0, "", True
        for g in got:
            a, r = _distance(g, want)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
            mismatch = compare_trees(want, g, "", rtol=rtol, atol=atol)
            if mismatch is not None and passed:
                passed, where = False, f"{mismatch.where} ({mismatch.expected} vs {mismatch.got})"
        results.append(PathResult(path, what, worst_abs, worst_rel, passed, where))

    per_device = [p for p in paths if p in ("pmap", "shard_map")]
    for path in paths:
        if random and path in per_device:
            continue
        add(path, "single-device jit", run(path), reference)
    if random and per_device:
        reference_off = single(dropout=False)
        for path in per_device:
            add(path, "single-device jit, dropout off on both", run(path, dropout=False), reference_off)
            axis = "batch" if path == "pmap" else "data"
            add(path, f"per-device masks on one device (vmap over {devices} shards)", run(path),
                per_device_on_one(axis))
    what = (f"the model draws random numbers in training ({sum(d.keyed for d in draws)} draw(s)): pmap and "
            f"shard_map draw one mask per device, and are compared with dropout off and with the per-device "
            f"computation on one device" if random else "the model draws no random numbers in training")
    return ParallelReport(devices, steps, rtol, atol, what, False, time.perf_counter() - start, tuple(results))


def check_parallel(model: Any, inputs: Any, labels: Any, *, loss_fn: Any = "cross_entropy", devices: int = 8,
                   steps: int = 3, paths=PATHS, rtol: float = PARALLEL_RTOL, atol: float = PARALLEL_ATOL,
                   precision: Any = None, train_kwarg: Any = "auto", subprocess: bool | None = None,
                   timeout: float = 600.0, fast_compile: bool = True) -> ParallelReport:
    """Proves a model trains the same on every parallel path as on one device (see the module doc).

    Example:
      >>> print(jnn.testing.check_parallel(MyModel(), x[:32], y[:32], devices=8))

    Args:
      model: a flax.linen or flax.nnx module.
      inputs, labels: one global batch; its size must be a multiple of `devices`. Each step
        trains on a new permutation of it.
      loss_fn: as for `jnn.make_train_step`.
      devices: how many devices to spread over.
      steps: training steps per path.
      paths: which of `PATHS` to compare.
      rtol, atol: per-element tolerance against the reference.
      precision, train_kwarg: as for `jnn.create_train_state`.
      subprocess: run in a subprocess with `devices` fake CPU devices. Default: only when this
        process has fewer than `devices` devices.
      timeout: seconds the subprocess may take.
      fast_compile: as for `check_model` (in the subprocess too).

    Returns:
      A `ParallelReport` (print it for the table of paths, references and differences).

    Raises:
      ModelCheckError: a path diverges beyond the tolerance (each failure names the path, its
        reference, the parameter or state path and the values).
      ValueError: an unknown path, or a batch that does not divide over the devices.
    """
    paths = (paths,) if isinstance(paths, str) else tuple(paths)
    unknown = sorted(set(paths) - set(PATHS))
    if unknown or not paths:
        raise ValueError(f"check_parallel: unknown path(s) {unknown or paths}; expected a non-empty subset of "
                         f"{list(PATHS)}.")
    size = batch_size(inputs, "check_parallel")
    if devices < 2 or size % devices:
        raise ValueError(f"check_parallel: a global batch of {size} examples over {devices} devices; expected "
                         f"devices >= 2 dividing the batch size. Fix: pass {devices * max(1, size // devices)} "
                         f"examples, or devices={max([d for d in range(2, size + 1) if size % d == 0] or [2])}.")
    args = dict(model=model, inputs=inputs, labels=labels, loss_fn=loss_fn, devices=devices, steps=steps,
                paths=paths, rtol=rtol, atol=atol, precision=precision, train_kwarg=train_kwarg)
    if subprocess is None:
        subprocess = jax.device_count() < devices
    if subprocess:
        report = _in_subprocess(dict(args, fast_compile=fast_compile), timeout)
    else:
        with compiling_fast(fast_compile):
            report = compare(**args)
    if not report.passed:
        raise ModelCheckError(
            [Failure("parallel", f"{r.path} diverges from {r.reference}.", where=r.worst.split(" (")[0],
                     expected=f"within rtol {report.rtol:g}, atol {report.atol:g} of the reference",
                     got=f"max |diff| {r.max_abs:.3g} (relative {r.max_rel:.3g}); {r.worst}",
                     cause="batch statistics not synchronised across devices, a collective over the wrong axis, "
                           "per-device state the model keeps outside its variables, or a model whose math depends "
                           "on the batch size (a batch-dependent normalisation)",
                     fix="run this path alone with jnn.parallel on 2 devices and compare its first step; see "
                         "README 'Parallelism' for what jnn synchronises")
             for r in report.results if not r.passed], header=str(report))
    return report


def _in_subprocess(args: dict, timeout: float) -> ParallelReport:
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import cloudpickle  # noqa: PLC0415 - grain's dependency; pickles test-local model classes by value

    from jnn.parallel._launch import with_cpu_devices  # noqa: PLC0415

    args = dict(args, config={name: getattr(jax.config, name) for name in _CONFIG})
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
               XLA_FLAGS=with_cpu_devices(os.environ.get("XLA_FLAGS", ""), args["devices"]))
    with tempfile.TemporaryDirectory(prefix="jnn-check-parallel-") as tmp:
        request, answer = os.path.join(tmp, "request.pkl"), os.path.join(tmp, "answer.pkl")
        with open(request, "wb") as f:
            cloudpickle.dump(args, f)
        start = time.perf_counter()
        code = f"from jnn.testing._parallel import _main; _main({request!r}, {answer!r})"
        proc = subprocess.run([sys.executable, "-c", code], env=env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(answer):
            raise RuntimeError(f"check_parallel: the subprocess with {args['devices']} fake CPU devices failed "
                               f"(exit code {proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(answer, "rb") as f:
            report = pickle.load(f)
    return dataclasses.replace(report, subprocess=True, seconds=time.perf_counter() - start)


def _main(request: str, answer: str) -> None:
    with open(request, "rb") as f:
        args = pickle.load(f)
    for name, value in args.pop("config").items():
        jax.config.update(name, value)
    with compiling_fast(args.pop("fast_compile")):
        report = compare(**args)
    with open(answer, "wb") as f:
        pickle.dump(report, f)

