"""Which random draws of a traced function depend on its key argument.

A dropout mask drawn from `jax.random.key(0)` inside a model, or from a key stored on the module,
is the same on every step: training runs, the loss falls, and nothing is ever wrong enough to see.
The draw is visible in the model's jaxpr, though: a `random_bits` whose key does not depend on the
key the step passed in. This module follows that dependence through the jaxpr, nested calls,
scans, loops and conds included.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from jax.extend import core as jex_core

# Primitives whose sub-jaxpr takes exactly the equation's operands, in order.
_POSITIONAL = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint", "custom_jvp_call",
               "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin", "shard_map")


@dataclasses.dataclass(frozen=True)
class Draw:
    """One `random_bits` equation: its output shape, whether its key depends on the key argument,
    and where it comes from (source line and module path)."""

    shape: tuple[int, ...]
    keyed: bool
    where: str


def _where(eqn, outer: str) -> str:
    """The user's source line and module path of an equation (its caller's, inside jax's own code)."""
    try:
        from jax._src import source_info_util  # noqa: PLC0415 - the summary jax prints in its own errors

        line = source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - a location is a courtesy; never fail the check over it
        line = ""
    if not line:
        return outer
    scope = str(eqn.source_info.name_stack)
    return f"{line}, module {scope}" if scope else line


def _jaxpr(x):
    return x.jaxpr if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns") else x


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(_jaxpr(v), "eqns"):
                yield _jaxpr(v)


def _walk(jaxpr, tainted_in: list[bool], draws: list[Draw], outer: str = "") -> list[bool]:
    """Propagates "depends on the key" from `jaxpr`'s inputs to its outputs; records the draws."""
    tainted: set = {v for v, t in zip(jaxpr.invars, tainted_in) if t}

    def is_t(v) -> bool:
        return not isinstance(v, jex_core.Literal) and v in tainted

    for eqn in jaxpr.eqns:
        ins = [is_t(v) for v in eqn.invars]
        name, where = eqn.primitive.name, _where(eqn, outer)
        if name == "random_bits":
            draws.append(Draw(tuple(eqn.params.get("shape", ())), ins[0], where))
            outs = [ins[0]] * len(eqn.outvars)
        elif name == "scan":
            body, consts, carry = _jaxpr(eqn.params["jaxpr"]), eqn.params["num_consts"], eqn.params["num_carry"]
            sub_in = list(ins)
            for _ in range(2):  # a carry that becomes keyed in the body is keyed from the next iteration on
                sub_out = _walk(body, sub_in, [])
                sub_in = sub_in[:consts] + [a or b for a, b in zip(sub_in[consts:consts + carry], sub_out[:carry])] \
                    + sub_in[consts + carry:]
            outs = _walk(body, sub_in, draws, where)
        elif name == "while":
            cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
            body = _jaxpr(eqn.params["body_jaxpr"])
            carry = ins[cn + bn:]
            for _ in range(2):
                carry = [a or b for a, b in zip(carry, _walk(body, ins[cn:cn + bn] + carry, []))]
            outs = _walk(body, ins[cn:cn + bn] + carry, draws, where)
        elif name == "cond":
            branch_outs = [_walk(_jaxpr(b), ins[1:], draws, where) for b in eqn.params["branches"]]
            outs = [ins[0] or any(col) for col in zip(*branch_outs)]
        elif name in _POSITIONAL and len(list(_sub_jaxprs(eqn))) >= 1:
            sub = next(_sub_jaxprs(eqn))
            outs = _walk(sub, ins, draws, where) if len(sub.invars) == len(ins) \
                else [any(ins)] * len(eqn.outvars)
            if len(outs) != len(eqn.outvars):
                outs = [any(ins)] * len(eqn.outvars)
        else:  # any other primitive (or one we do not know): keyed if any operand is
            for sub in _sub_jaxprs(eqn):
                _walk(sub, [any(ins)] * len(sub.invars), draws, where)
            outs = [any(ins)] * len(eqn.outvars)
        tainted.update(v for v, t in zip(eqn.outvars, outs) if t)
    return [is_t(v) for v in jaxpr.outvars]


def random_draws(fn: Callable, args: tuple, key_argnum: int) -> list[Draw]:
    """The random draws of `fn(*args)`, each marked keyed if its key depends on `args[key_argnum]`."""
    closed = jax.make_jaxpr(fn)(*args)
    flags = [i == key_argnum for i, a in enumerate(args) for _ in jax.tree.leaves(a)]
    draws: list[Draw] = []
    _walk(closed.jaxpr, flags, draws)
    return draws


__all__ = ["Draw", "random_draws"]
