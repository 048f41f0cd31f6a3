"""Imports of the reference libraries the parity and export tests compare against.

torchvision's wheel on the package registry is built for CUDA: with the CPU torch its compiled
operators do not load, and its `_meta_registrations` (fake kernels for torch.compile of those
operators) then fails at import with `operator torchvision::nms does not exist`, which also
breaks `import transformers` and `import timm` (both import torchvision). Only then, the import is
retried without that module: the models and their weights do not need it (torchvision's detection
operators stay unavailable, as they already were).
"""
import importlib
import sys
import types


def import_torchvision():
    """torchvision, imported with its fake-kernel registrations skipped where its compiled ops do not load."""
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    return importlib.import_module("torchvision")


def import_reference(name: str):
    """`transformers` or `timm` (which import torchvision), after `import_torchvision`."""
    import_torchvision()
    return importlib.import_module(name)
