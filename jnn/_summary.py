"""`jnn.summary`: module paths, types, output shapes, parameter counts and FLOPs of a model, with
the memory of its parameters, model state and optimizer state.

`summary(model_or_state, inputs)` traces the model once on shapes (nothing is computed or
allocated), records every module call (linen: `nn.intercept_methods`; nnx: each module class's
`__call__`, wrapped for the trace only), and asks XLA's cost analysis for the FLOPs of each
module's call, lowered on its own (lowered, not compiled). It is what `jnn models NAME --summary`
and `jnn train --summary` print.

Example:
  >>> table = jnn.summary(jnn.models.get("digits_cnn"), np.zeros((1, 8, 8, 1), np.float32),
  ...                     tx=optax.adam(1e-3))
  >>> table.params
  151306
  >>> print(table)  # doctest: +ELLIPSIS
  DigitsCNN on float32[1,8,8,1] (eval mode)
  ...
  params: 151,306 (591.04 KiB)
  ...
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Any, Callable, Sequence

import jax
import numpy as np

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    """One module of the summary.

    Attributes:
      path: the module's path in the model, e.g. `("stage1_block1", "conv1")`; `()` for the model.
      type: the module's class name.
      outputs: its output shapes, as `dtype[shape]` strings (one per output array).
      params: trainable parameters of the module and its submodules.
      flops: XLA's cost analysis of the module's call, on the summary's inputs (None: not computed).
    """

    path: tuple[str, ...]
    type: str
    outputs: tuple[str, ...]
    params: int
    flops: int | None


@dataclasses.dataclass(frozen=True)
class Summary:
    """What `summary` returns; `str(summary)` is the table.

    Attributes:
      name: the model's class name.
      inputs: the input shapes, as `dtype[shape]` strings.
      rows: one per module, in call order (the model first).
      params / params_bytes: trainable parameters, and their bytes.
      model_state / model_state_bytes: the other variables (e.g. BatchNorm statistics).
      opt_state / opt_state_bytes: the optimizer state's values (None: no optimizer given).
      flops: the whole model's forward FLOPs on `inputs` (None: not computed).
      loops: the model runs a loop (`lax.scan`, `nn.RNN`, `while_loop`): XLA's cost analysis
        counts a loop's body once, so `flops` holds one iteration of each loop.
    """

    name: str
    inputs: tuple[str, ...]
    rows: tuple[SummaryRow, ...]
    params: int
    params_bytes: int
    model_state: int
    model_state_bytes: int
    opt_state: int | None
    opt_state_bytes: int | None
    flops: int | None
    loops: bool = False

    def __str__(self) -> str:
        return render(self)


def summary(model_or_state: Any, inputs: Any = None, *, tx: Any = None, depth: int | None = None,
            flops: bool = True) -> Summary:
    """A summary of a flax model (linen or nnx) or of a `jnn.TrainState`, on example inputs.

    Args:
      model_or_state: a `flax.linen.Module`, a `flax.nnx.Module` or a `TrainState` (from
        `create_train_state` or `abstract_train_state`).
      inputs: an example batch (an array, or a tuple/dict of arrays, as `create_train_state`
        takes); FLOPs and output shapes are for this batch size. Optional for a `TrainState`: by
        default a batch of one example of the shapes it was created with.
      tx: the optax optimizer, to report the memory of its state (a `TrainState` has its own).
      depth: only modules at most this deep (0: the model alone; None: every module).
      flops: ask XLA for the FLOPs of every module (one lowering per module; False: skip).

    Returns:
      A `Summary`; print it for the table.

    Raises:
      ValueError: not a flax module or `TrainState`; `inputs` the model cannot take; `depth` < 0.
    """
    from jnn.train.state import TrainState, abstract_train_state  # noqa: PLC0415 - jnn.train imports much

    if depth is not None and depth < 0:
        raise ValueError(f"summary: depth={depth}; expected None (every module) or a depth >= 0.")
    if isinstance(model_or_state, TrainState):
        state = model_or_state
        if inputs is None:
            inputs = _inputs_of(state)
        name = _model_name(state.model)
    else:
        if inputs is None:
            raise ValueError("summary: a model needs example inputs, e.g. summary(model, x[:1]); only a "
                             "TrainState knows its input shapes.")
        import optax  # noqa: PLC0415

        state = abstract_train_state(model_or_state, tx if tx is not None else optax.identity(), inputs, 0)
        name = type(model_or_state).__name__
    shapes = _abstract(inputs)
    calls = _record_calls(state, shapes)
    params = _model_params(state)
    has_tx = isinstance(model_or_state, TrainState) or tx is not None
    rows = tuple(SummaryRow(c.path, c.type, c.outputs, _count_under(params, c.path), c.flops() if flops else None)
                 for c in calls if depth is None or len(c.path) <= depth)
    return Summary(
        name=name, inputs=tuple(_shape_str(x) for x in jax.tree.leaves(shapes)), rows=rows,
        params=_count(state.params), params_bytes=_nbytes(state.params),
        model_state=_count(state.model_state), model_state_bytes=_nbytes(state.model_state),
        opt_state=_count(state.opt_state) if has_tx else None,
        opt_state_bytes=_nbytes(state.opt_state) if has_tx else None,
        flops=calls[0].flops() if flops else None,
        loops=flops and _has_loop(_eval_run(state), state.params, state.model_state, shapes))


# ------------------------------------------------------------------ recording the calls


@dataclasses.dataclass
class _Call:
    order: int
    path: tuple[str, ...]
    type: str
    outputs: tuple[str, ...]
    flops: Callable[[], int | None]


def _record_calls(state, inputs) -> list[_Call]:
    """Every module call of one eval-mode run of the model on shapes, first call per path."""
    calls: dict[tuple[str, ...], _Call] = {}
    model = state.model
    kind = getattr(model, "kind", "linen")
    counter = itertools.count()

    def keep(order, path, module_type, out, flops):
        if path is not None and (path not in calls or calls[path].order > order):
            outputs = tuple(_shape_str(x) for x in jax.tree.leaves(out) if hasattr(x, "shape"))
            calls[path] = _Call(order, path, module_type, outputs, flops)

    run = _eval_run(state)
    if kind == "nnx":
        with _nnx_recorder(keep, counter, state):
            jax.eval_shape(run, state.params, state.model_state, inputs)
    else:
        import flax.linen as nn  # noqa: PLC0415

        def record(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            order = next(counter)
            out = next_fun(*args, **kwargs)
            path = tuple(context.module.path)
            keep(order, path, type(context.module).__name__, out,
                 _linen_flops(context.module, path, state, args, kwargs))
            return out

        with nn.intercept_methods(record):
            jax.eval_shape(run, state.params, state.model_state, inputs)
    if () not in calls:  # e.g. a model whose top-level method is not __call__
        keep(-1, (), _model_name(model), jax.eval_shape(run, state.params, state.model_state, inputs),
             lambda: _cost(run, state.params, state.model_state, inputs))
    return sorted(calls.values(), key=lambda c: c.order)


def _eval_run(state) -> Callable:
    """The model in eval mode as a pure function `(params, model_state, inputs) -> outputs`."""
    def run(params, model_state, x):
        return state.model.apply(params, model_state, x, train=False, rng=jax.random.key(0))[0]

    return run


def _linen_flops(module, path, state, args, kwargs) -> Callable[[], int | None]:
    """The FLOPs of one linen call, lowered on its own: the module unbound from its parent, its
    variables taken from the model's at `path`, array arguments as shapes, the others static."""
    unbound = module.clone(parent=None)
    dynamic, rebuild = _split_static((args, kwargs))
    variables = {"params": _model_params(state), **state.model_state}
    sub = {c: _subtree(v, path) for c, v in variables.items()}
    sub = {c: v for c, v in sub.items() if v is not None}
    streams = getattr(state.model, "rng_streams", ())

    def apply(v, leaves):
        a, k = rebuild(leaves)
        rngs = {name: jax.random.key(i) for i, name in enumerate(streams)}
        return unbound.apply(v, *a, rngs=rngs, mutable=True, **k)

    return functools.lru_cache(None)(lambda: _cost(apply, _abstract(sub), dynamic))


class _nnx_recorder:
    """Wraps `__call__` of every module class of an nnx model for one trace, then restores them."""

    def __init__(self, keep, counter, state):
        from flax import nnx  # noqa: PLC0415

        self.keep, self.counter, self.state, self.nnx = keep, counter, state, nnx
        module = state.model.merge(*_abstract((state.params, state.model_state)))  # classes only: no arrays
        self.owners = {_defining(type(m)) for _, m in nnx.iter_modules(module)} - {None}
        self.saved: dict[type, Any] = {}
        self.paths: dict[int, tuple[str, ...]] | None = None

    def __enter__(self):
        for cls in self.owners:
            self.saved[cls] = cls.__dict__["__call__"]
            cls.__call__ = self._wrap(self.saved[cls])
        return self

    def __exit__(self, *exc):
        for cls, original in self.saved.items():
            cls.__call__ = original

    def _wrap(self, original):
        recorder = self

        @functools.wraps(original)
        def call(obj, *args, **kwargs):
            if recorder.paths is None:  # the first call is the model's: map every submodule to its path
                recorder.paths = {id(m): tuple(str(p) for p in path)
                                  for path, m in recorder.nnx.iter_modules(obj)}
            order = next(recorder.counter)
            out = original(obj, *args, **kwargs)
            path = recorder.paths.get(id(obj))
            recorder.keep(order, path, type(obj).__name__, out,
                          _nnx_flops(recorder.state, path, original, args, kwargs))
            return out

        return call


def _nnx_flops(state, path, original, args, kwargs) -> Callable[[], int | None]:
    """The FLOPs of one nnx call: the model merged inside a trace of its own, the submodule at
    `path` called alone (its unused parameters cost nothing)."""
    dynamic, rebuild = _split_static((args, kwargs))

    def apply(params, model_state, leaves):
        module = state.model.merge(_model_params(state, params), model_state)
        module.eval()
        for key in path or ():
            module = module[int(key)] if key.isdigit() and not hasattr(module, key) else getattr(module, key)
        a, k = rebuild(leaves)
        return original(module, *a, **k)

    return functools.lru_cache(None)(lambda: _cost(apply, _abstract(state.params), _abstract(state.model_state),
                                                   dynamic))


def _defining(cls: type) -> type | None:
    """The class in `cls`'s MRO that defines `__call__` (None: none below `object`)."""
    for base in cls.__mro__:
        if "__call__" in base.__dict__ and base is not object:
            return base
    return None


# ------------------------------------------------------------------ shapes, counts, bytes, FLOPs


def _cost(fn, *args) -> int | None:
    """XLA's FLOP count of `jit(fn)` on `args` (shapes), from the lowered (not compiled) program."""
    try:
        cost = _lower(fn, *args).cost_analysis()
    except Exception:  # noqa: BLE001 - a module that cannot run alone: no FLOPs column entry
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if cost is None:
        return None
    return int(cost.get("flops", 0))  # a program with no arithmetic (e.g. dropout in eval) has no entry


def _lower(fn, *args):
    return jax.jit(fn).lower(*args)


def _has_loop(fn, *args) -> bool:
    """Whether the program has a loop (`lax.scan`, `while_loop`): XLA counts a loop's body once."""
    try:
        return "stablehlo.while" in _lower(fn, *args).as_text()
    except Exception:  # noqa: BLE001
        return False


def _split_static(tree) -> tuple[list, Callable]:
    """Array leaves as shapes (traced) and a function rebuilding the tree with the others (static)."""
    leaves, treedef = jax.tree.flatten(tree)
    arrays = [i for i, x in enumerate(leaves) if hasattr(x, "shape") and hasattr(x, "dtype")]
    dynamic = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) for i in arrays]

    def rebuild(values):
        full = list(leaves)
        for i, value in zip(arrays, values):
            full[i] = value
        return treedef.unflatten(full)

    return dynamic, rebuild


def _abstract(tree: PyTree) -> PyTree:
    def leaf(x):
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else np.result_type(x))

    return jax.tree.map(leaf, tree)


def _model_params(state, params=None) -> PyTree:
    from jnn.train.model import _model_params as reparam  # noqa: PLC0415 - e.g. LoRA merged

    return reparam(state.model.reparam, state.params if params is None else params)


def _shape_str(x) -> str:
    return f"{np.dtype(x.dtype).name if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else 'key'}" \
           f"[{','.join(str(d) for d in x.shape)}]"


def _count(tree: PyTree) -> int:
    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def _nbytes(tree: PyTree) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            total += int(np.prod(np.shape(x))) * 8  # a threefry key's two uint32 words
        else:
            total += int(np.prod(np.shape(x))) * np.dtype(x.dtype).itemsize
    return total


def _subtree(tree: PyTree, path: Sequence[str]) -> PyTree | None:
    for key in path:
        if not hasattr(tree, "keys"):
            return None
        if key not in tree and key.isdigit() and int(key) in tree:  # nnx lists of modules
            key = int(key)
        if key not in tree:
            return None
        tree = tree[key]
    return tree


def _count_under(params: PyTree, path: tuple[str, ...]) -> int:
    sub = _subtree(params, path)
    return 0 if sub is None else _count(sub)


def _inputs_of(state) -> Any:
    """One example of the inputs a `TrainState` was created with (zeros)."""
    if state.spec is None:
        raise ValueError("summary: this TrainState has no input description; pass inputs=.")
    leaves = [np.zeros((1, *shape), dtype) for _, shape, dtype in state.spec.inputs]
    return jax.tree.unflatten(state.spec.input_tree, leaves)


def _model_name(model) -> str:
    module = getattr(model, "module", None)
    if module is not None:
        return type(module).__name__
    graphdef = getattr(model, "graphdef", None)
    return getattr(getattr(graphdef, "type", None), "__name__", None) or type(model).__name__


# ------------------------------------------------------------------ the table


def _human(n: float, unit: str = "") -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def _bytes(n: int) -> str:
    for scale, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _name(path: tuple[str, ...], shown: set) -> str:
    """The path below its nearest listed ancestor (`layers/0` when `layers` made no call), indented."""
    if not path:
        return "(model)"
    parent = next((i for i in range(len(path) - 1, 0, -1) if path[:i] in shown), 0)
    return "  " * (parent + 1) + "/".join(path[parent:])


def render(s: Summary) -> str:
    """The table of a `Summary` (what `str(summary)` returns)."""
    head = ("module", "type", "output", "params", "FLOPs")
    shown = {r.path for r in s.rows}
    body = [(_name(r.path, shown), r.type, ", ".join(r.outputs), f"{r.params:,}",
             "-" if r.flops is None else _human(r.flops)) for r in s.rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]
    right = (False, False, False, True, True)

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    lines = [f"{s.name} on {', '.join(s.inputs)} (eval mode)", rule, line(head), rule, *map(line, body), rule,
             f"params: {s.params:,} ({_bytes(s.params_bytes)})",
             f"model state (e.g. batch statistics): {s.model_state:,} ({_bytes(s.model_state_bytes)})"]
    if s.opt_state is None:
        lines.append("optimizer state: not included (pass tx=)")
    else:
        lines.append(f"optimizer state: {s.opt_state:,} ({_bytes(s.opt_state_bytes)})")
    total = s.params_bytes + s.model_state_bytes + (s.opt_state_bytes or 0)
    lines.append(f"memory of the state: {_bytes(total)}")
    if s.flops is not None:
        lines.append(f"forward FLOPs on {', '.join(s.inputs)}: {_human(s.flops)} (XLA cost analysis; "
                     f"module rows include their submodules)")
    if s.loops:
        lines.append("the model runs a loop (scan / while): XLA counts a loop's body once, so its FLOPs are "
                     "one iteration's")
    return "\n".join(lines)


__all__ = ["SummaryRow", "Summary", "render", "summary"]
