"""jnn's XLA CPU option as the process default: `set_process_default()`, run by `import jnn`.

Kept apart from `jnn.compiler`, and free of JAX imports, so `import jnn` can set it before JAX (and
its backends) start, without importing JAX itself. See `jnn.compiler` for what the option does.
"""
from __future__ import annotations

import os
import sys

# XLA:CPU's default YNNPACK fusions in jaxlib 0.10 are individual dots, individual convolutions
# and reductions; this is that list without the convolutions.
_YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
_CPU_OPTIONS = {_YNN_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# The jaxlib versions whose defaults the list above was measured against: [low, high).
_MEASURED_JAXLIB = ((0, 10), (0, 11))
_OPT_OUT = "JNN_XLA_DEFAULTS"


def _flag_value() -> str | None:
    """The value `XLA_FLAGS` gives the YNNPACK option, or None."""
    for flag in os.environ.get("XLA_FLAGS", "").split():
        if flag.startswith(f"--{_YNN_FLAG}="):
            return flag.split("=", 1)[1]
    return None


def set_process_default() -> bool:
    """Adds jnn's CPU option to `XLA_FLAGS` for the whole process (called by `import jnn`).

    Only while JAX's backends are not initialised (XLA reads its flags once, at that moment),
    with a jaxlib whose defaults were measured, unless `XLA_FLAGS` already sets the option or
    `JNN_XLA_DEFAULTS=0`. The flag is read by XLA's CPU compiler only; other backends ignore it.

    Returns:
      Whether the option is now the process's default.
    """
    if os.environ.get(_OPT_OUT, "1").lower() in ("0", "off", "false", "no") or _flag_value() is not None:
        return process_default()
    if "jax" in sys.modules:  # imported already: its backends may have started (then it is too late)
        try:
            from jax._src import xla_bridge  # noqa: PLC0415 - the one probe of "initialised"

            if xla_bridge.backends_are_initialized():
                return False
        except (ImportError, AttributeError):
            return False
    try:
        from importlib.metadata import version as installed  # noqa: PLC0415 - without importing jaxlib

        version = tuple(int(p) for p in installed("jaxlib").split(".")[:2])
    except Exception:  # noqa: BLE001 - no jaxlib metadata: leave XLA's defaults alone
        return False
    if not _MEASURED_JAXLIB[0] <= version < _MEASURED_JAXLIB[1]:
        return False
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS", ""),
                                                     f"--{_YNN_FLAG}={_CPU_OPTIONS[_YNN_FLAG]}"]))
    return True


def process_default() -> bool:
    """Whether every CPU program of this process is compiled with jnn's option (via `XLA_FLAGS`)."""
    return _flag_value() == _CPU_OPTIONS[_YNN_FLAG]
