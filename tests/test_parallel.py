"""Every way of spreading the train step over devices computes what one device computes.

Same seed, same 10 global batches: single-device jit vs sharded jit on 2/4/8 devices and on a 4 x 2
(data x model) mesh, FSDP on 8 and on 4 x 2, pmap and shard_map on 8 (conftest gives 8 fake CPU devices), for a plain MLP and a BatchNorm model. Each run
also counts traces: one per path, however many steps. Then the errors a user can cause.
"""
import functools
from typing import Any, NamedTuple

import chex
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jnn
from jnn import parallel
from tests import tolerances as tol
from tests._parallel_models import BNNet, CE, MLP, STEPS, batches, optimizer

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py

MODELS = {"mlp": MLP, "bn": BNNet}
PATHS = ("jit-2", "jit-4", "jit-8", "jit-4x2", "fsdp-8", "fsdp-4x2", "pmap-8", "shard_map-8")  # 4x2: data x model
BATCHES = batches()


class Counted:
    """Wraps a step and counts how often JAX traces it (the Python body runs only when tracing)."""

    def __init__(self, fn):
        self.fn, self.traces = fn, 0
        self.axis_name = getattr(fn, "axis_name", None)

    def __call__(self, state, batch):
        self.traces += 1
        return self.fn(state, batch)


class Run(NamedTuple):
    variables: Any  # host numpy {"params": ..., **model_state}
    traces: int
    specs: Any  # PartitionSpec of each parameter after training


@functools.cache
def _template(kind: str):
    """The initial state, created once (creation compiles) and kept as host numpy."""
    state = jnn.create_train_state(MODELS[kind](), optimizer(), BATCHES[0]["inputs"][:1], jax.random.key(0))
    return state, jax.tree.map(np.asarray, state.replace(rng=jax.random.key_data(state.rng)))


def _fresh(kind: str):
    """A new copy of the initial state: fresh buffers, so each path may donate its own."""
    state, host = _template(kind)
    return host.replace(rng=jax.random.wrap_key_data(host.rng.copy(), impl=jax.random.key_impl(state.rng)))


def _specs(tree):
    return jax.tree.map(lambda x: getattr(x.sharding, "spec", None), tree)


@functools.cache
def _run(kind: str, path: str) -> Run:
    """Trains STEPS steps on BATCHES along `path`; cached so each path compiles once per session."""
    name, _, devices = path.partition("-")
    if name == "single":
        step = Counted(jnn.make_train_step(CE))
        jitted, state = jax.jit(step, donate_argnums=0), _fresh(kind)
        for batch in BATCHES:
            state, _ = jitted(state, batch)
        return Run(parallel.to_host(state.variables), step.traces, _specs(state.params))
    if name in ("jit", "fsdp"):
        data, _, model = devices.partition("x")  # "4x2": 4 on the data axis x 2 on the model axis
        mesh = parallel.make_mesh(data=int(data), model=int(model or 1))
        step = Counted(jnn.make_train_step(CE))
        dp = parallel.data_parallel(step, mesh, fsdp=name == "fsdp")
        state = dp.shard_state(_fresh(kind))
        for batch in BATCHES:
            state, _ = dp(state, parallel.shard_batch(batch, mesh))
        return Run(parallel.to_host(state.variables), step.traces, _specs(state.params))
    if name == "shard_map":
        step = Counted(jnn.make_train_step(CE, axis_name="data"))
        sm = parallel.shard_map_train_step(step, parallel.make_mesh())
        state = sm.shard_state(_fresh(kind))
        for batch in BATCHES:
            state, _ = sm(state, sm.shard_batch(batch))
        return Run(parallel.to_host(state.variables), step.traces, _specs(state.params))
    assert name == "pmap", path
    step = Counted(jnn.make_train_step(CE, axis_name="batch"))
    pm = parallel.pmap_train_step(step)
    state = pm.replicate(_fresh(kind))
    for batch in BATCHES:
        state, _ = pm(state, pm.shard_batch(batch))
    state = parallel.pmap_unreplicate(state)
    return Run(parallel.to_host(state.variables), step.traces, _specs(state.params))


def _max_errors(got, want) -> tuple[float, float]:
    """(max |got - want|, max |got - want| / max |want|) over all leaves."""
    abs_err = max(float(np.max(np.abs(g - w))) for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    rel = max(float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1e-30))
              for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    return abs_err, rel


# ----------------------------------------------------------------------------------------------
# Equality with single-device training, and no re-tracing.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("path", PATHS)
def test_path_matches_single_device(kind, path):
    want, got = _run(kind, "single"), _run(kind, path)
    abs_err, rel_err = _max_errors(got.variables, want.variables)
    print(f"{kind} {path}: max abs error {abs_err:.3g}, max error / max |param| {rel_err:.3g}")
    chex.assert_trees_all_close(got.variables, want.variables, rtol=tol.PARALLEL_RTOL,
                                atol=tol.PARALLEL_ATOL)
    assert got.traces == 1, f"{path} traced {got.traces} times in {STEPS} steps"


def test_single_device_traces_once():
    assert _run("mlp", "single").traces == 1


def test_bn_run_has_batch_statistics():
    """The BatchNorm comparisons above include the running statistics, not only the params."""
    assert "batch_stats" in _run("bn", "pmap-8").variables


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_pmap_and_shard_map_are_bitwise_equal(kind):
    """Same per-device arithmetic and the same psums: the same bits."""
    chex.assert_trees_all_equal(_run(kind, "pmap-8").variables, _run(kind, "shard_map-8").variables)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_fsdp_is_bitwise_sharded_jit(kind):
    chex.assert_trees_all_equal(_run(kind, "fsdp-8").variables, _run(kind, "jit-8").variables)


def test_one_device_mesh_is_bitwise_single_device():
    """Where the arithmetic is the same (a mesh of one device), the result is exactly the same."""
    mesh = parallel.make_mesh(data=1)
    dp = parallel.data_parallel(jnn.make_train_step(CE), mesh)
    state = dp.shard_state(_fresh("mlp"))
    for batch in BATCHES:
        state, _ = dp(state, batch)  # host batches are placed by jit
    chex.assert_trees_all_equal(parallel.to_host(state.variables), _run("mlp", "single").variables)


def test_fsdp_shards_parameters_and_optimizer_state():
    specs = _run("mlp", "fsdp-8").specs
    assert specs["Dense_0"]["kernel"] == P(None, "data")  # (12, 32): 32 is the largest divisible
    assert specs["Dense_1"]["kernel"] == P("data")  # (32, 10)
    assert specs["Dense_1"]["bias"] == P()  # (10,): no axis divisible by 8
    mesh = parallel.make_mesh()
    state = parallel.shard_state(_fresh("mlp"), mesh, fsdp=True)
    mu = state.opt_state[0].mu["Dense_0"]["kernel"]
    assert mu.sharding.spec == P(None, "data")
    assert mu.addressable_shards[0].data.shape == (12, 4)


@pytest.mark.parametrize("fsdp", [False, True], ids=["replicated", "fsdp"])
def test_eval_step_under_data_parallel_matches_single_device(fsdp):
    """The eval step runs on the train step's layout (FSDP too) and sums over the whole global batch."""
    mesh = parallel.make_mesh(data=4, model=2)
    train = parallel.data_parallel(jnn.make_train_step(CE), mesh, fsdp=fsdp)
    state = train.shard_state(_fresh("bn"))
    for batch in BATCHES[:3]:
        state, _ = train(state, parallel.shard_batch(batch, mesh))
    evaluate = parallel.data_parallel(jnn.make_eval_step(CE, confusion=True), mesh, fsdp=fsdp, donate=False)
    got = jnn.metrics.compute(evaluate(state, parallel.shard_batch(BATCHES[4], mesh)))
    if fsdp:  # evaluation left the FSDP layout in place
        assert state.params["Dense_0"]["kernel"].sharding.spec == P(None, "data")
    single = jax.tree.map(np.asarray, parallel.to_host(state))  # one device, from host copies
    want = jnn.metrics.compute(jax.jit(jnn.make_eval_step(CE, confusion=True))(single, BATCHES[4]))
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
    assert got["accuracy"] == want["accuracy"]
    np.testing.assert_array_equal(got["confusion"], want["confusion"])
    assert got["confusion"].sum() == len(BATCHES[4]["labels"])


def test_fsdp_spec_picks_largest_divisible_axis():
    assert parallel.fsdp_spec((6, 16, 8), 8) == P(None, "data")
    assert parallel.fsdp_spec((16, 16), 8) == P("data")
    assert parallel.fsdp_spec((3, 5), 8) == P()
    assert parallel.fsdp_spec((), 8) == P()
    assert parallel.fsdp_spec((1024,), 8, min_size=4096) == P()


def test_unsynced_batch_norm_differs():
    """The BatchNorm comparison has teeth: per-device statistics give a different model."""
    step = jnn.make_train_step(CE, axis_name="data")
    sm = parallel.shard_map_train_step(step, parallel.make_mesh(), sync_batch_stats=False)
    state = sm.shard_state(_fresh("bn"))
    for batch in BATCHES:
        state, _ = sm(state, sm.shard_batch(batch))
    abs_err, _ = _max_errors(parallel.to_host(state.params), _run("bn", "single").variables["params"])
    assert abs_err > 1e-3


# ----------------------------------------------------------------------------------------------
# Placement helpers.
# ----------------------------------------------------------------------------------------------


def test_make_mesh_axes_and_auto_types():
    mesh = parallel.make_mesh()
    assert mesh.axis_names == ("data", "model") and mesh.shape == {"data": 8, "model": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert parallel.make_mesh(model=2).shape == {"data": 4, "model": 2}
    assert parallel.make_mesh(data=2).size == 2
    with pytest.raises(ValueError, match="model=3 must be a positive divisor of the 8"):
        parallel.make_mesh(model=3)
    with pytest.raises(ValueError, match="needs 16 devices, but 8 are available"):
        parallel.make_mesh(data=16)


def test_shard_batch_splits_leading_axis():
    mesh = parallel.make_mesh()
    sharded = parallel.shard_batch(BATCHES[0], mesh)
    x = sharded["inputs"]
    assert x.shape == (64, 12) and x.sharding.spec == P("data")
    assert {s.data.shape for s in x.addressable_shards} == {(8, 12)}
    np.testing.assert_array_equal(np.asarray(x), BATCHES[0]["inputs"])


def test_replicate_puts_a_copy_on_every_device():
    mesh = parallel.make_mesh()
    x = parallel.replicate({"w": np.arange(6.0, dtype=np.float32)}, mesh)["w"]
    assert x.sharding.is_fully_replicated and len(x.addressable_shards) == 8


def test_pmap_replicate_and_unreplicate_without_gathering():
    tree = {"w": np.arange(6.0, dtype=np.float32).reshape(2, 3), "rng": jax.random.key(1)}
    stacked = parallel.pmap_replicate(tree)
    w = stacked["w"]
    assert w.shape == (8, 2, 3) and len(w.sharding.device_set) == 8
    assert [s.data.shape for s in w.addressable_shards] == [(1, 2, 3)] * 8
    back = parallel.pmap_unreplicate(stacked)
    assert len(back["w"].devices()) == 1  # one device's copy, not a gather of all eight
    np.testing.assert_array_equal(np.asarray(back["w"]), tree["w"])
    np.testing.assert_array_equal(jax.random.key_data(back["rng"]), jax.random.key_data(tree["rng"]))


# ----------------------------------------------------------------------------------------------
# Errors a user can cause, raised before compiling with the batch size, device count and fix.
# ----------------------------------------------------------------------------------------------


def _odd_batch(n=60):
    return {"inputs": BATCHES[0]["inputs"][:n], "labels": BATCHES[0]["labels"][:n]}


def test_indivisible_batch_raises_before_tracing():
    step = Counted(jnn.make_train_step(CE))
    dp = parallel.data_parallel(step, parallel.make_mesh())
    with pytest.raises(ValueError, match=r"global batch size 60 .* 8 devices of mesh axis 'data'.*"
                                         r"multiple of 8 \(e.g. 56 or 64\)"):
        dp(dp.shard_state(_fresh("mlp")), _odd_batch())
    assert step.traces == 0


@pytest.mark.parametrize("place", ["shard_batch", "pmap_shard_batch"])
def test_indivisible_batch_refused_by_placement(place):
    args = (parallel.make_mesh(),) if place == "shard_batch" else ()
    with pytest.raises(ValueError, match=r"global batch size 60 .* 8 devices .* multiple of 8"):
        getattr(parallel, place)(_odd_batch(), *args)


def test_unknown_mesh_axis():
    mesh = parallel.make_mesh()
    with pytest.raises(ValueError, match=r"axes \('data', 'model'\).*no axis 'batch'"):
        parallel.data_parallel(jnn.make_train_step(CE), mesh, data_axis="batch")
    with pytest.raises(ValueError, match=r"no axis 'rows'"):
        parallel.shard_map_train_step(loss_fn=CE, mesh=mesh, data_axis="rows")
    with pytest.raises(ValueError, match=r"no axis 'x'"):
        parallel.shard_batch(BATCHES[0], mesh, data_axis="x")


@pytest.mark.parametrize("where", ["one_device", "other_mesh"])
def test_batch_on_wrong_devices(where):
    mesh = parallel.make_mesh()
    dp = parallel.data_parallel(jnn.make_train_step(CE), mesh, donate=False)
    if where == "one_device":
        batch = jax.device_put(BATCHES[0], jax.devices()[0])
        pattern = r"global batch size 64\) lives on 1 device\(s\) \[0\].*8 devices.*shard_batch"
    else:
        batch = parallel.shard_batch(BATCHES[0], parallel.make_mesh(data=4))
        pattern = r"global batch size 64\) lives on 4 device\(s\).*8 devices.*shard_batch"
    with pytest.raises(ValueError, match=pattern):
        dp(dp.shard_state(_fresh("mlp")), batch)


def test_pmap_batch_without_device_axis():
    pm = parallel.pmap_train_step(loss_fn=CE, donate=False)
    with pytest.raises(ValueError, match=r"leading device axis of size 8.*got 64.*step.shard_batch"):
        pm(pm.replicate(_fresh("mlp")), BATCHES[0])


def test_step_and_path_must_agree_on_the_axis():
    with pytest.raises(ValueError, match="built without axis_name"):
        parallel.pmap_train_step(jnn.make_train_step(CE))
    with pytest.raises(ValueError, match="built with axis_name='batch'.*make_train_step\\(loss\\)"):
        parallel.data_parallel(jnn.make_train_step(CE, axis_name="batch"), parallel.make_mesh())
    with pytest.raises(ValueError, match="reduces over axis_name='batch'.*data axis is 'data'"):
        parallel.shard_map_train_step(jnn.make_train_step(CE, axis_name="batch"), parallel.make_mesh())
    with pytest.raises(ValueError, match="exactly one of"):
        parallel.pmap_train_step(jnn.make_train_step(CE, axis_name="batch"), loss_fn=CE)


def test_initialize_is_a_no_op_without_configuration(monkeypatch):
    for key in ("JNN_COORDINATOR", "JNN_NUM_PROCESSES", "JNN_PROCESS_ID", "JAX_COORDINATOR_ADDRESS",
                "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(key, raising=False)
    assert parallel.initialize() is False
    monkeypatch.setenv("JNN_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match=r"JNN_NUM_PROCESSES=2 but \['JNN_COORDINATOR', 'JNN_PROCESS_ID'\] unset"):
        parallel.initialize()
    assert parallel.data_shard() == (0, 1)
