"""Module attributes imported on first use (PEP 562), for the packages whose names load lazily."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def attributes(package: str, names: dict[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: `names` maps each public name to the module that
    defines it; a name is imported on first use, then kept in `namespace` (the package's
    `globals()`), so later lookups are plain attribute reads."""
    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        namespace[name] = value
        return value

    return __getattr__
