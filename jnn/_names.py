"""Names and fields, in one place: the error for a name that is not in a registry (losses,
optimizers, schedules, presets, models, config keys), the error for a config field out of its
range, and parameter paths as the "a/b/kernel" strings that freeze, learning-rate-group, LoRA and
pruning patterns match."""
from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Sequence

import jax


def unknown(kind: str, name: object, valid: Iterable[str], fix: str = "") -> ValueError:
    """`ValueError("unknown <kind> <name>; expected one of [...]. Did you mean 'x'?<fix>")`."""
    valid = list(valid)
    close = difflib.get_close_matches(str(name), valid, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}; expected one of {valid}.{hint}{' ' + fix if fix else ''}")


def key_name(key: Any) -> str:
    """One pytree key as a plain name: a dict key, an attribute name, a sequence index."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Sequence[Any]) -> str:
    """A pytree path as "a/b/kernel" (what `jax.tree_util.tree_leaves_with_path` gives, joined)."""
    return "/".join(key_name(k) for k in path)


def check_patterns(tree: Any, patterns: Sequence[str], where: str) -> list[re.Pattern]:
    """Compiled `patterns`; each must match some path of `tree` (the paths are listed if not).

    Raises:
      ValueError: a pattern that matches no path, naming every path that exists.
    """
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    compiled = [re.compile(p) for p in patterns]
    for pattern, c in zip(patterns, compiled):
        if not any(c.search(p) for p in paths):
            raise ValueError(f"{where}: pattern {pattern!r} matches no parameter; the parameter paths are "
                             f"{paths}. Fix: a regular expression on one of them, e.g. '^{paths[0].split('/')[0]}/'.")
    return compiled


def check_fields(where: str, config: Any, rules: dict[str, tuple[bool, str]]) -> None:
    """Raises a `ValueError` naming the first field whose rule fails: `{field: (ok, expected)}`.

    Every config checks its fields when it is built, before anything runs.
    """
    for field, (ok, expected) in rules.items():
        if not ok:
            raise ValueError(f"{where}: {field}={getattr(config, field)!r}; expected {field} {expected}. "
                             f"Fix: choose {field} {expected} (in a config file or with --set).")
