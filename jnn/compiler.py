"""`jnn.jit`: `jax.jit` with the XLA options jnn measured to be faster, and layers that match them.

On CPU, jaxlib 0.10 hands convolutions to YNNPACK by default, and YNNPACK computes a
convolution's kernel gradient (a convolution with the whole image as its window) 6-13x slower
than XLA's other CPU convolution (Eigen's): 259 ms against 20 ms for a 16 -> 16 3x3 layer of
ResNet-20 at batch 128 (`benchmarks/studies/README.md`). `compiler_options()` keeps XLA's other YNNPACK
fusions (matrix products and reductions) and drops the convolutions. The options only change
which kernels run: values are equal up to the order of float sums.

Process default: `import jnn` adds the option to `XLA_FLAGS` when JAX's backends are not yet
initialised (the usual order: imports first), so every program of the process gets it, compiled
with `jax.jit` or `jnn.jit`, jnn's steps or a user's own flax model; `jnn.layers` then take their
fastest formulation under plain `jax.jit` too (`options_active()`). Opt out with
`JNN_XLA_DEFAULTS=0` before `import jnn`; `process_default()` says whether it is in effect.
Imported after JAX has run something, jnn cannot change the process's flags: then `jnn.jit` is
`jax.jit` with those options, and while it traces, `jnn.layers` know the program is compiled with
them. jnn compiles its own steps with it (`fit`, `evaluate`, `jnn train`, `jnn.parallel`).
Elsewhere (GPU, TPU, another jaxlib, or `xla_cpu_experimental_ynn_fusion_type` set in `XLA_FLAGS`
by the user) the options are empty and `jnn.jit` is `jax.jit`.

Example:
  >>> import jax, jnn, optax
  >>> step = jnn.jit(jnn.make_train_step(optax.softmax_cross_entropy_with_integer_labels),
  ...                donate_argnums=0)
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from jnn._xla_default import _CPU_OPTIONS, _MEASURED_JAXLIB, _YNN_FLAG, process_default, set_process_default
_active: contextvars.ContextVar[bool] = contextvars.ContextVar("jnn_compiler_options", default=False)


def compiler_options(backend: str | None = None) -> dict[str, str]:
    """The XLA options `jnn.jit` adds for `backend` (default: JAX's default backend).

    Non-empty only on CPU, with a jaxlib whose defaults were measured, when `XLA_FLAGS` does not
    already set the option.
    """
    if (backend or jax.default_backend()) != "cpu" or _YNN_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}
    return dict(_CPU_OPTIONS) if _supported() else {}


@functools.cache
def _supported() -> bool:
    import jaxlib

    version = tuple(int(p) for p in jaxlib.__version__.split(".")[:2])
    if not _MEASURED_JAXLIB[0] <= version < _MEASURED_JAXLIB[1]:
        return False
    try:  # the option exists in this build
        jax.jit(lambda x: x, compiler_options=_CPU_OPTIONS).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - any refusal means: do not pass it
        return False
    return True


def options_active() -> bool:
    """Whether the function being traced now will be compiled with jnn's CPU option: under
    `jnn.jit`, or anywhere on CPU when it is the process default."""
    return _active.get() or (process_default() and jax.default_backend() == "cpu")


@contextlib.contextmanager
def _tracing_with_options() -> Iterator[None]:
    token = _active.set(True)
    try:
        yield
    finally:
        _active.reset(token)


def jit(fun: Callable, **kwargs: Any) -> Any:
    """`jax.jit(fun, **kwargs)` with `compiler_options()` merged under the caller's own.

    JAX takes compiler options on a top-level call only; called inside another transformation
    (`jax.vmap`, `jax.grad`, another `jax.jit`), the result runs as plain `jax.jit(fun)`, which
    the enclosing program compiles with its own options.

    Args:
      fun: the function to compile (a jnn `Step` too).
      **kwargs: `jax.jit`'s keyword arguments (`donate_argnums`, `in_shardings`, ...). A
        `compiler_options` dict given here wins over jnn's entries.

    Returns:
      The jitted function (`lower`, `trace` and `eval_shape` as `jax.jit`'s).
    """
    options = compiler_options()
    if not options:
        return jax.jit(fun, **kwargs)
    return _Jitted(fun, kwargs, {**options, **(kwargs.get("compiler_options") or {})})


class _Jitted:
    """A `jax.jit` compiled with jnn's options when called at the top level, plain when nested."""

    def __init__(self, fun: Callable, kwargs: dict[str, Any], options: dict[str, str]):
        @functools.wraps(fun)
        def traced(*args, **kw):
            with _tracing_with_options():
                return fun(*args, **kw)

        self._top = jax.jit(traced, **{**kwargs, "compiler_options": options})
        self._nested_kwargs = {k: v for k, v in kwargs.items() if k != "compiler_options"}
        self._fun, self._nested = fun, None
        functools.update_wrapper(self, fun)

    def __call__(self, *args, **kwargs):
        try:
            return self._top(*args, **kwargs)
        except ValueError as error:
            if "top-level" not in str(error):
                raise
        if self._nested is None:
            self._nested = jax.jit(self._fun, **self._nested_kwargs)
        return self._nested(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._top, name)
