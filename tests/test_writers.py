"""Run-directory writers: JSON lines, TensorBoard event files (read back), PNG curves and confusion matrix."""
import glob
import struct

import matplotlib.image
import numpy as np
import pytest

from jnn import writers


def _read_tensorboard_scalars(logdir):
    """{tag: [(step, value)]} of the scalar events, in file order."""
    out = {}
    for event in _read_events(logdir):
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_run_writers_write_all_three_and_resume_appends(tmp_path):
    w = writers.make_run_writers(tmp_path)
    w.write(10, {"loss": 1.0, "accuracy": 0.5, "learning_rate": 0.1, "confusion": np.eye(2)}, "train")
    w.write(20, {"loss": 0.5, "accuracy": 0.75, "learning_rate": 0.05}, "train")
    w.write(20, {"loss": 0.6, "accuracy": 0.7}, "eval")
    w.close()
    records = writers.read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["split"], r["loss"]) for r in records] == [(10, "train", 1.0), (20, "train", 0.5), (20, "eval", 0.6)]
    assert "confusion" not in records[0]
    scalars = _read_tensorboard_scalars(tmp_path / "tb")
    assert scalars["train/loss"] == [(10, 1.0), (20, 0.5)]
    assert scalars["eval/accuracy"] == [(20, np.float32(0.7))]
    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    # A resumed run appends, never truncates.
    w2 = writers.make_run_writers(tmp_path, tensorboard=False)
    w2.write(30, {"loss": 0.25}, "train")
    w2.close()
    assert [r["step"] for r in writers.read_jsonl(tmp_path / "metrics.jsonl")] == [10, 20, 20, 30]


def test_read_jsonl_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert writers.read_jsonl(path) == [{"step": 1, "loss": 2.0}]


def test_console_writer_formats_one_line(capsys):
    writers.ConsoleWriter().write(7, {"loss": 0.123456, "learning_rate": 3e-5}, "eval")
    assert capsys.readouterr().out.strip() == "[eval] step 7  loss 0.1235  learning_rate 3.000e-05"


def test_resumed_curves_drop_steps_logged_past_the_checkpoint(tmp_path):
    """A run killed at step 30 after its checkpoint at 20 logged 30; the resumed run logs 30 again."""
    w = writers.make_run_writers(tmp_path, tensorboard=False, png=False)
    for step, loss in ((10, 1.0), (20, 0.5), (30, 0.4)):
        w.write(step, {"loss": loss}, "train")
    w.close()
    resumed = writers.make_run_writers(tmp_path, tensorboard=False, resume_step=20)
    curves = next(x for x in resumed.writers if isinstance(x, writers.CurvesWriter))
    assert curves._series[("train", "loss")] == [(10, 1.0), (20, 0.5)]
    resumed.write(30, {"loss": 0.45}, "train")
    resumed.close()
    assert curves._series[("train", "loss")] == [(10, 1.0), (20, 0.5), (30, 0.45)]
    # metrics.jsonl keeps everything it ever recorded.
    assert [r["loss"] for r in writers.read_jsonl(tmp_path / "metrics.jsonl")] == [1.0, 0.5, 0.4, 0.45]


def test_curves_after_two_resumes_keep_only_the_last_attempt_at_each_step(tmp_path):
    """Killed at 30 (checkpoint 20), resumed and killed at 45 (checkpoint 40), resumed again."""
    w = writers.make_run_writers(tmp_path, tensorboard=False, png=False)
    for step, loss in ((10, 1.0), (20, 0.5), (30, 0.4), (30, 0.45), (40, 0.3), (45, 0.2)):
        w.write(step, {"loss": loss}, "train")
    w.write(20, {"loss": 0.6}, "eval")
    w.close()
    resumed = writers.make_run_writers(tmp_path, tensorboard=False, resume_step=40)
    curves = next(x for x in resumed.writers if isinstance(x, writers.CurvesWriter))
    assert curves._series[("train", "loss")] == [(10, 1.0), (20, 0.5), (30, 0.45), (40, 0.3)]
    assert curves._series[("eval", "loss")] == [(20, 0.6)]
    resumed.close()


def test_resumed_tensorboard_purges_events_after_the_checkpoint(tmp_path):
    w = writers.make_run_writers(tmp_path, png=False)
    for step, loss in ((10, 1.0), (20, 0.5), (30, 0.4)):
        w.write(step, {"loss": loss}, "train")
    w.close()
    resumed = writers.make_run_writers(tmp_path, png=False, resume_step=20)
    resumed.write(30, {"loss": 0.45}, "train")
    resumed.close()
    events = _read_tensorboard_scalars(tmp_path / "tb")["train/loss"]
    assert events[-1] == (30, np.float32(0.45))
    # TensorBoard drops events from step 21 on that precede a SessionLog START at step 21.
    from tensorboardX.proto import event_pb2

    starts = [event.step for event in _read_events(tmp_path / "tb")
              if event.session_log.status == event_pb2.SessionLog.START]
    assert starts == [21]


def _read_events(logdir):
    """Parses TFRecord-framed Event protos the way TensorBoard does (length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(f"{logdir}/events.out.tfevents.*")):
        data, pos = open(path, "rb").read(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            out.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return out


def test_confusion_figure_normalises_rows_and_labels_every_class():
    import matplotlib.pyplot as plt

    confusion = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 0]])  # class "c" has no example: a blank row
    fig = writers.confusion_figure(confusion, ["a", "b", "c"])
    ax = fig.axes[0]
    rates = np.ma.filled(ax.images[0].get_array(), np.nan)
    np.testing.assert_allclose(rates[:2], [[0.8, 0.2, 0.0], [0.25, 0.75, 0.0]])
    assert np.isnan(rates[2]).all()
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names == [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert sorted(t.get_text() for t in ax.texts) == ["20", "25", "75", "80"]  # percentages of the row
    assert "14 examples, accuracy 0.7857" in ax.get_title()
    plt.close(fig)
    big = writers.confusion_figure(np.eye(100, dtype=int) * 5, [f"class {i}" for i in range(100)])
    ax = big.axes[0]
    assert len(ax.get_xticklabels()) == 100 and not ax.texts  # every class labelled, no cell text
    assert min(t.get_fontsize() for t in ax.get_xticklabels()) >= 6 and big.get_size_inches()[1] >= 18
    plt.close(big)
    with pytest.raises(ValueError, match=r"expected a square \(C, C\) matrix of counts; got shape \(2, 3\)"):
        writers.confusion_figure(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="2 class names for 3 classes; expected one per class"):
        writers.confusion_figure(np.eye(3), ["a", "b"])


def test_run_writers_draw_the_test_confusion_matrix(tmp_path):
    w = writers.make_run_writers(tmp_path, tensorboard=False, class_names=["x", "y"])
    w.write(5, {"loss": 1.0}, "eval")
    assert not (tmp_path / "confusion.png").exists()  # only the test report has one
    w.write(5, {"accuracy": 0.5, "confusion": np.array([[1, 1], [1, 1]])}, "test")
    w.close()
    image = matplotlib.image.imread(tmp_path / writers.CONFUSION_FILE)
    assert image.shape[:2] == (500, 600)  # 10 classes or fewer: a 6 x 5 inch figure at 100 dpi


def test_tensorboard_events_are_written_without_importing_pytorch(tmp_path):
    """tensorboardX imports PyTorch (2 s of CPU) only to annotate its arguments; jnn's writer must not
    pay for it, and a process that imports PyTorch itself must still have it afterwards."""
    pytest.importorskip("torch")  # installed with the dev extras: without it there is nothing to avoid
    import subprocess
    import sys

    code = ("import sys; from jnn import writers; w = writers.TensorBoardWriter(sys.argv[1]); "
            "w.write(1, {'loss': 0.5}); w.close(); print('torch' in sys.modules); import torch; "
            "import tensorboardX.x2num as x; print(x.make_np(torch.ones(2)).sum())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tb")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "2.0"]
    assert _read_tensorboard_scalars(tmp_path / "tb")["train/loss"] == [(1, np.float32(0.5))]


def test_importing_tensorboardx_hides_pytorch_from_that_thread_only():
    """While jnn imports tensorboardX without PyTorch, another thread's `import torch` still works."""
    pytest.importorskip("torch")
    import subprocess
    import sys

    # The import of tensorboardX is held inside its module code, not inside a finder: finders run
    # under Python's global import lock, which would block every thread's imports.
    code = """
import importlib.abc, importlib.machinery, sys, threading
from jnn import writers
entered, release, seen = threading.Event(), threading.Event(), []
class Hold(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorboardX":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            entered.set()
            seen.append(release.wait(60))
            run(module)
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, Hold())
t = threading.Thread(target=writers.summary_writer); t.start()
assert entered.wait(60), "tensorboardX was not imported"
assert any(isinstance(f, writers._NoTorchHere) for f in sys.meta_path)  # the hiding is in place
import importlib.util
seen.append(importlib.util.find_spec("torch") is not None)
import torch
seen.append(torch.ones(2).sum().item())
release.set(); t.join()
import tensorboardX.writer as w
print(seen, w.numpy_compatible.__module__)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # The other thread found and imported torch while the hiding was in place, and released it.
    assert out.stdout.split()[:3] == ["[True,", "2.0,", "True]"], out.stdout
