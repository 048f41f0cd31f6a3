"""Metric writers: JSON lines, TensorBoard event files (tensorboardX), PNG curves and confusion
matrix, console, and the Weights & Biases and MLflow trackers (`WandbWriter`, `MlflowWriter`).

Every writer has `write(step, metrics, split)` and `close()`; `MultiWriter` fans out to several.
Values are host floats: the loop converts device metrics once per logging interval, not per step.
"""
from __future__ import annotations

import importlib.abc
import json
import math
import os
import sys
import threading
import time
from collections import defaultdict
from typing import Mapping, Sequence, TextIO

import numpy as np

Scalars = Mapping[str, float]
CONFUSION_FILE = "confusion.png"


def scalars(metrics: Mapping[str, object]) -> dict[str, float]:
    """The scalar entries of a metrics dict as Python floats (arrays such as a confusion dropped)."""
    return {k: float(np.asarray(v)) for k, v in metrics.items()
            if not isinstance(v, Mapping) and np.ndim(v) == 0}


def preload() -> None:
    """Imports tensorboardX and matplotlib in a daemon thread, so that a run that compiles its
    step meanwhile (XLA frees the GIL) does not wait for them at its first log: 0.5-0.9 s of
    imports measured on a 2-core CPU (`benchmarks/studies/README.md`)."""
    def imports() -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
        summary_writer()

    threading.Thread(target=imports, daemon=True).start()


def summary_writer():
    """tensorboardX's `SummaryWriter` class, imported without PyTorch.

    `tensorboardX.writer` imports PyTorch when it is installed, only to annotate its arguments
    (`numpy_compatible`): 2 s of CPU per process for scalars that never meet a tensor. While it is
    first imported, and only if PyTorch is not imported yet, `import torch` fails in this thread
    alone (`_NoTorchHere`); other threads import it as usual, tensorboardX imports it again inside
    the functions that take tensors, and a process that imports PyTorch itself is unaffected.
    """
    with _TENSORBOARDX_LOCK:
        finder = None
        if "torch" not in sys.modules and "tensorboardX.writer" not in sys.modules:
            finder = _NoTorchHere()
            sys.meta_path.insert(0, finder)
        try:
            from tensorboardX import SummaryWriter
        finally:
            if finder is not None:
                sys.meta_path.remove(finder)
    return SummaryWriter


class _NoTorchHere(importlib.abc.MetaPathFinder):
    """Finds no `torch` for the thread that created it (an import there raises ModuleNotFoundError);
    every other import, and every other thread, goes on to the next finders."""

    def __init__(self):
        self.thread = threading.get_ident()

    def find_spec(self, name, path=None, target=None):
        if threading.get_ident() == self.thread and name.partition(".")[0] == "torch":
            raise ModuleNotFoundError(f"No module named {name!r} (jnn imports tensorboardX without it)", name=name)
        return None


_TENSORBOARDX_LOCK = threading.Lock()


class JsonlWriter:
    """Appends one JSON object per write to `path`: `{"step", "split", "time", **metrics}`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # append: a resumed run keeps its history

    def write(self, step: int, metrics: Scalars, split: str = "train") -> None:
        record = {"step": int(step), "split": split, "time": round(time.time(), 3), **scalars(metrics)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Reads a metrics.jsonl file back (skipping a torn last line from a crash)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class TensorBoardWriter:
    """TensorBoard event files under `logdir`, one scalar tag per `split/metric`.

    The event file is opened at the first write: `jnn train` imports tensorboardX (without
    PyTorch, `summary_writer`) in a thread while the train step compiles, so nothing waits for it
    before the first metrics are logged.
    """

    def __init__(self, logdir: str | os.PathLike, purge_step: int | None = None):
        self.logdir = os.fspath(logdir)
        self.purge_step = purge_step  # a resumed run: TensorBoard hides older events from this step on
        self._writer = None

    def write(self, step: int, metrics: Scalars, split: str = "train") -> None:
        if self._writer is None:
            self._writer = summary_writer()(self.logdir, purge_step=self.purge_step)
        for name, value in scalars(metrics).items():
            self._writer.add_scalar(f"{split}/{name}", value, int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


class CurvesWriter:
    """A PNG of the loss, accuracy and learning-rate curves, redrawn on `flush()` and `close()`."""

    PANELS = ("loss", "accuracy", "learning_rate")

    def __init__(self, path: str | os.PathLike, history: Sequence[Mapping] = ()):
        self.path = os.fspath(path)
        self._series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        self._dirty = False
        for record in history:  # a resumed run draws its whole history
            self.write(record["step"], record, record.get("split", "train"))

    def write(self, step: int, metrics: Scalars, split: str = "train") -> None:
        if split == "test":  # a single final point: reported in text, not drawn
            return
        for name, value in scalars({k: v for k, v in metrics.items() if k in self.PANELS}).items():
            self._series[(split, name)].append((int(step), value))
            self._dirty = True

    def flush(self) -> None:
        if not self._dirty:  # drawing takes ~1 s: only when there is something new
            return
        self._dirty = False
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [p for p in self.PANELS if any(name == p for _, name in self._series)]
        if not panels:
            return
        width, height = 4.5 * len(panels), 3.4
        fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
        # Margins in inches, fixed: room for the tick labels, titles and x labels these panels have.
        # `fig.tight_layout()` measures them with one more drawing: 0.27 s instead of 0.18 s per PNG.
        axes_width = (width - 0.82 - 0.75 * (len(panels) - 1)) / len(panels)
        fig.subplots_adjust(left=0.7 / width, right=1 - 0.12 / width, bottom=0.5 / height, top=1 - 0.3 / height,
                            wspace=0.75 / axes_width)
        for ax, panel in zip(axes[0], panels):
            for (split, name), points in sorted(self._series.items()):
                if name == panel and points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, label=split, marker="o" if len(points) < 30 else None, markersize=3)
            ax.set_title(panel.replace("_", " "))
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        tmp = self.path + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.path)  # never leave a half-written PNG

    def close(self) -> None:
        self.flush()


def confusion_figure(confusion, class_names: Sequence[str] | None = None, title: str | None = None):
    """A matplotlib figure of a confusion matrix, each row normalised by its true class's count.

    Rows are true classes, columns predicted ones (`jnn.metrics.confusion_matrix`'s layout). Up to
    20 classes each cell shows its percentage; beyond, the colour alone, on a square-root scale so
    that small confusions stay visible, with guide lines every 10 classes (every class stays
    labelled, and the figure grows with the number of classes). A class without examples is a
    blank row.

    Args:
      confusion: a (C, C) array of counts.
      class_names: C labels (default: 0 .. C-1).
      title: the figure's title (default: the number of examples and the accuracy).

    Returns:
      A `matplotlib.figure.Figure` (close it with `matplotlib.pyplot.close`).

    Raises:
      ValueError: `confusion` is not square, or `class_names` is not one name per class.
    """
    counts = np.asarray(confusion, np.float64)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1]:
        raise ValueError(f"plot_confusion: expected a square (C, C) matrix of counts; got shape {counts.shape}.")
    n = counts.shape[0]
    names = [str(c) for c in (class_names if class_names is not None else range(n))]
    if len(names) != n:
        raise ValueError(f"plot_confusion: {len(names)} class names for {n} classes; expected one per class.")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    support = counts.sum(1, keepdims=True)
    rates = np.divide(counts, support, out=np.full_like(counts, np.nan), where=support > 0)
    total = counts.sum()
    side = min(max(5.0, 0.16 * n + 3.0), 22.0)  # 10 classes: 5 in; 100: 19 in (~0.17 in per cell)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    # A square-root colour scale: a 5% confusion is visible next to a 95% diagonal.
    image = ax.imshow(rates, cmap="Blues", norm=matplotlib.colors.PowerNorm(0.5, vmin=0.0, vmax=1.0),
                      interpolation="nearest")
    fontsize = 9 if n <= 20 else max(6.0, 10 - n / 25)  # 100 classes: 6 pt labels, 17-pixel cells
    ax.set_xticks(range(n), names, rotation=90 if n > 10 or max(map(len, names)) > 3 else 0, fontsize=fontsize)
    ax.set_yticks(range(n), names, fontsize=fontsize)
    big = max(10.0, side / 1.6)  # titles that stay legible on the large figures of many classes
    ax.set_xlabel("predicted class", fontsize=big)
    ax.set_ylabel("true class", fontsize=big)
    if n > 20:  # guide lines every 10 classes, to follow a row or column across the matrix
        for k in range(10, n, 10):
            ax.axhline(k - 0.5, color="0.6", linewidth=0.5)
            ax.axvline(k - 0.5, color="0.6", linewidth=0.5)
    else:
        for i in range(n):
            for j in range(n):
                if rates[i, j] > 0:
                    ax.text(j, i, f"{100 * rates[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if rates[i, j] > 0.5 else "black")
    accuracy = np.trace(counts) / total if total else float("nan")
    ax.set_title(title or f"confusion matrix: {int(total)} examples, accuracy {accuracy:.4f}\n"
                          f"each row: % of the true class's examples", fontsize=big)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("share of the true class")
    fig.tight_layout()
    return fig


def plot_confusion(confusion, path: str | os.PathLike, class_names: Sequence[str] | None = None,
                   title: str | None = None) -> str:
    """Writes `confusion_figure(confusion, class_names, title)` to the PNG `path` (atomically).

    Returns:
      `path`, as a string.
    """
    fig = confusion_figure(confusion, class_names, title)  # selects the Agg backend first
    import matplotlib.pyplot as plt

    path = os.fspath(path)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)  # never leave a half-written PNG
    return path


class ConfusionWriter:
    """Draws `confusion.png` from the test report (`split == "test"` with a `"confusion"` matrix)."""

    def __init__(self, path: str | os.PathLike, class_names: Sequence[str] | None = None):
        self.path = os.fspath(path)
        self.class_names = class_names

    def write(self, step: int, metrics: Mapping, split: str = "train") -> None:
        if split == "test" and "confusion" in metrics:
            plot_confusion(metrics["confusion"], self.path, self.class_names)

    def close(self) -> None:
        pass


class ConsoleWriter:
    """One line per write, e.g. `[eval] step 200  loss 0.0412  accuracy 0.9889`."""

    def __init__(self, stream: TextIO | None = None, splits: Sequence[str] | None = None):
        self._stream = stream
        self._splits = splits

    def write(self, step: int, metrics: Scalars, split: str = "train") -> None:
        if self._splits is not None and split not in self._splits:
            return
        parts = [f"[{split}] step {int(step)}"]
        for name, value in scalars(metrics).items():
            parts.append(f"{name} {_fmt(value)}")
        print("  ".join(parts), file=self._stream or sys.stdout, flush=True)

    def close(self) -> None:
        pass


def _fmt(value: float) -> str:
    if value == 0 or math.isnan(value) or 1e-3 <= abs(value) < 1e5:
        return f"{value:.4f}"
    return f"{value:.3e}"


class MultiWriter:
    """Writes to every writer in turn."""

    def __init__(self, writers: Sequence):
        self.writers = list(writers)

    def write(self, step: int, metrics: Scalars, split: str = "train") -> None:
        for writer in self.writers:
            writer.write(step, metrics, split)

    def flush(self) -> None:
        for writer in self.writers:
            getattr(writer, "flush", lambda: None)()

    def close(self) -> None:
        for writer in self.writers:
            writer.close()

    def __enter__(self) -> "MultiWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_run_writers(run_dir: str | os.PathLike, *, tensorboard: bool = True, png: bool = True,
                     console: bool = False, resume_step: int | None = None,
                     class_names: Sequence[str] | None = None) -> MultiWriter:
    """The standard writers of a run directory: metrics.jsonl, tb/ event files, curves.png, and
    confusion.png (drawn from a test report's confusion matrix, with `class_names`).

    A run directory that already has a metrics.jsonl (a resumed run) keeps it and appends. A run
    killed after its last checkpoint logged steps that the resumed run trains and logs again, so
    curves.png redraws only the last attempt at each step, up to `resume_step` (the step the run
    resumes from), and TensorBoard is told to drop older events after it (`purge_step`).
    """
    run_dir = os.fspath(run_dir)
    jsonl_path = os.path.join(run_dir, "metrics.jsonl")
    history = _last_attempts(read_jsonl(jsonl_path)) if os.path.exists(jsonl_path) else []
    if resume_step is not None:
        history = [record for record in history if record.get("step", 0) <= resume_step]
    writers: list = [JsonlWriter(jsonl_path)]
    if tensorboard:
        purge = resume_step + 1 if resume_step is not None and history else None
        writers.append(TensorBoardWriter(os.path.join(run_dir, "tb"), purge_step=purge))
    if png:
        writers.append(CurvesWriter(os.path.join(run_dir, "curves.png"), history))
        writers.append(ConfusionWriter(os.path.join(run_dir, CONFUSION_FILE), class_names))
    if console:
        writers.append(ConsoleWriter())
    return MultiWriter(writers)


def _last_attempts(records: Sequence[Mapping]) -> list[Mapping]:
    """The records of the last attempt at each step: a split's step going back starts a new attempt."""
    kept: list[Mapping] = []
    last: dict[str, int] = {}
    for record in records:
        split, step = record.get("split", "train"), record.get("step", 0)
        if step <= last.get(split, -1):  # rare: only after a resume
            kept = [r for r in kept if r.get("split", "train") != split or r.get("step", 0) < step]
        last[split] = step
        kept.append(record)
    return kept


def __getattr__(name: str):
    """`jnn.writers.WandbWriter` / `MlflowWriter`: defined in `jnn.trackers`, imported on first use."""
    if name in ("WandbWriter", "MlflowWriter"):
        from jnn import trackers

        return getattr(trackers, name)
    raise AttributeError(f"module 'jnn.writers' has no attribute {name!r}")


__all__ = ["CONFUSION_FILE", "ConfusionWriter", "ConsoleWriter", "CurvesWriter", "JsonlWriter", "MlflowWriter",
           "MultiWriter", "TensorBoardWriter", "WandbWriter", "confusion_figure", "make_run_writers", "plot_confusion",
           "preload", "read_jsonl", "scalars"]
