"""The one error for a name that is not in a registry: losses, optimizers, schedules, presets,
models, config keys. It lists the valid names and suggests the closest ones."""
from __future__ import annotations

import difflib
from typing import Iterable


def unknown(kind: str, name: object, valid: Iterable[str], fix: str = "") -> ValueError:
    """`ValueError("unknown <kind> <name>; expected one of [...]. Did you mean 'x'?<fix>")`."""
    valid = list(valid)
    close = difflib.get_close_matches(str(name), valid, n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    return ValueError(f"unknown {kind} {name!r}; expected one of {valid}.{hint}{' ' + fix if fix else ''}")
