"""Sphinx configuration of jnn's documentation: the README tour, then one page per public name.

Build: `python -m sphinx -W -b html docs docs/_build/html` (what `tests/test_docs.py` runs, with
warnings as errors). The API pages are generated when Sphinx reads this file from the modules'
public names (`__all__`, else the functions and classes a module defines), so a new public name
gets its page without anyone editing these files.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

project = "jnn"
author = "the jnn authors"
copyright = "2026, the jnn authors"  # noqa: A001 - Sphinx's name
extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon", "myst_parser"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
templates_path = ["_templates"]  # a class page: its docstring and members, without a table of methods
html_theme = "alabaster"  # bundled with Sphinx; furo measured 4x slower on 290 pages (its sidebar)
html_title = "jnn"
default_role = "code"  # `name` in a docstring is code, as in the README
napoleon_google_docstring, napoleon_numpy_docstring = True, False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: no second description beside autodoc's members
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
myst_heading_anchors = 3
suppress_warnings = ["myst.xref_missing"]  # the README links files of the repository, not pages

# The modules with an API page, in the order of the index: the core, then each idea's module.
MODULES = {
    "jnn": "the core: state, steps, fit, summary, configs",
    "jnn.models": "the model zoo and its registry",
    "jnn.data": "data sets and input pipelines",
    "jnn.writers": "run-directory writers and trackers",
    "jnn.trackers": "Weights & Biases and MLflow",
    "jnn.profiling": "jax.profiler traces of chosen steps",
    "jnn.parallel": "data parallelism on one or many hosts",
    "jnn.testing": "correctness checks for your own model",
    "jnn.metrics": "classification metrics and accumulators",
    "jnn.losses": "loss functions",
    "jnn.optim": "optimizers, schedules, plateaus",
    "jnn.checkpoint": "orbax checkpoints of the whole state",
    "jnn.config": "run configuration",
    "jnn.presets": "named run configurations",
    "jnn.experiment": "a whole run from a config",
    "jnn.precision": "mixed precision policies",
    "jnn.adversarial": "FGSM and PGD attacks, robust training",
    "jnn.transfer": "pretrained weights",
    "jnn.lora": "low-rank adapters",
    "jnn.pruning": "gradual magnitude pruning",
    "jnn.quantize": "int8 quantization",
    "jnn.vmap": "per-example gradients, DP-SGD, ensembles",
    "jnn.layers": "pooling and convolution layers",
    "jnn.compiler": "jax.jit with jnn's XLA options",
}
# Modules without __all__ that re-export names defined in an undocumented module.
ALSO_FROM = {"jnn.optim": ("jnn.plateau",)}


def public_names(modname: str) -> list[str]:
    """The public names of a module (submodules excluded): `__all__`, else what it defines."""
    module = importlib.import_module(modname)
    if hasattr(module, "__all__"):
        names = list(module.__all__)
    else:
        homes = (modname, *ALSO_FROM.get(modname, ()))
        names = [name for name, obj in vars(module).items() if not name.startswith("_")
                 and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ in homes]
    return sorted((n for n in names if not inspect.ismodule(getattr(module, n))), key=str.lower)


def write_api_pages(srcdir: str) -> None:
    """docs/api/<module>.rst: the module's docstring and an autosummary of its public names, each
    name on a page of its own (autosummary writes those into docs/api/generated/). Run when this
    file is read, before Sphinx looks for source files."""
    api = os.path.join(srcdir, "api")
    os.makedirs(api, exist_ok=True)
    index = ["API reference", "=============", "", ".. toctree::", "   :maxdepth: 1", ""]
    for modname, what in MODULES.items():
        index.append(f"   {modname}")
        title = f"``{modname}``: {what}"
        lines = [title, "=" * len(title), "", f".. automodule:: {modname}", "   :no-members:", "",
                 ".. autosummary::", "   :toctree: generated", "   :nosignatures:", ""]
        lines += [f"   {name}" for name in public_names(modname)]
        _write(os.path.join(api, f"{modname}.rst"), "\n".join(lines) + "\n")
    _write(os.path.join(api, "index.rst"), "\n".join(index) + "\n")


def _write(path: str, text: str) -> None:
    if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:  # unchanged: no rebuild
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def drop_type_docstrings(app, what, name, obj, options, lines) -> None:
    """A constant without a doc comment would show its type's docstring (dict's, str's): none."""
    if what in ("data", "attribute") and lines and inspect.getdoc(type(obj)) and \
            "\n".join(lines).strip() == inspect.getdoc(type(obj)).strip():
        lines.clear()


write_api_pages(os.path.dirname(os.path.abspath(__file__)))


def setup(app):
    app.connect("autodoc-process-docstring", drop_type_docstrings)
