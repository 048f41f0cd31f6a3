"""jnn.summary: parameter counts against flax's tabulate and the zoo's published counts, FLOPs against
hand counts, memory, linen and nnx, and `jnn models NAME --summary`."""
import re

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from flax import nnx

import jnn
from jnn import compiler
from jnn import cli

pytestmark = pytest.mark.fast_compile  # compile-bound: see tests/conftest.py


def _published(name):
    """The parameter count a zoo preset's description publishes, e.g. "(62,006 params)"."""
    found = re.search(r"([\d,]{5,}) params", jnn.models.spec(name).description)
    return None if found is None else int(found.group(1).replace(",", ""))


PUBLISHED = [name for name in jnn.models.names() if _published(name) is not None]


def test_the_zoo_publishes_counts_for_the_reference_models():
    assert {"lenet5", "resnet18", "resnet50", "gpt2_small", "vit_base", "vae_mnist"} <= set(PUBLISHED)


@pytest.mark.parametrize("name", PUBLISHED)
def test_param_counts_match_the_zoo_published_counts(name):
    s = jnn.summary(jnn.models.get(name), jnn.models.example_input(name, 1), flops=False)
    assert s.params == _published(name)
    assert s.rows[0].path == () and s.rows[0].params == s.params  # the model's row holds everything


def _tabulate_totals(text):
    """{column: total} of the "Total" footer row of flax's rich table (linen and nnx alike)."""
    lines = text.splitlines()
    header = next(line for line in lines if "┃" in line and "path" in line)
    total = next(line for line in lines if re.search(r"│\s*Total\s*│", line))
    names = [c.strip() for c in header.strip().strip("┃").split("┃")]
    cells = [c.strip() for c in total.strip().strip("│").split("│")]
    return {n: int(c.split()[0].replace(",", "")) for n, c in zip(names, cells) if c and c[0].isdigit()}


@pytest.mark.parametrize("name", ["digits_cnn", "resnet20", "gpt_char_tiny", "lstm_classifier"])
def test_linen_counts_agree_with_flax_tabulate(name):
    model, x = jnn.models.get(name), jnn.models.example_input(name, 1)
    text = nn.tabulate(model, jax.random.key(0), console_kwargs={"width": 400, "force_terminal": False})(x)
    totals = _tabulate_totals(text)
    s = jnn.summary(model, x, flops=False)
    assert s.params == totals["params"]
    assert s.model_state == totals.get("batch_stats", 0)
    assert (name == "resnet20") == (s.model_state > 0)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(64, 32, rngs=rngs)
        self.norm = nnx.BatchNorm(32, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(32, 32, rngs=rngs) for _ in range(2)])
        self.out = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.hidden(x.reshape(len(x), -1))))
        for block in self.blocks:
            x = nnx.relu(block(x))
        return self.out(x)


def test_nnx_counts_rows_and_flops():
    model, x = NnxMLP(nnx.Rngs(0)), np.zeros((4, 8, 8, 1), np.float32)
    totals = _tabulate_totals(nnx.tabulate(model, x, console_kwargs={"width": 400, "force_terminal": False}))
    s = jnn.summary(model, x, tx=optax.sgd(0.1, momentum=0.9))
    by_hand = 64 * 32 + 32 + 64 + 2 * (32 * 32 + 32) + 32 * 10 + 10  # hidden, norm's scale and bias, blocks, out
    assert (s.params, s.model_state) == (totals["Param"], totals["BatchStat"]) == (by_hand, 64)
    rows = {r.path: r for r in s.rows}
    assert s.name == "NnxMLP" and rows[()].type == "NnxMLP"
    assert set(rows) == {(), ("hidden",), ("norm",), ("blocks", "0"), ("blocks", "1"), ("out",)}
    assert rows[("blocks", "1")].outputs == ("float32[4,32]",) and rows[("blocks", "1")].params == 32 * 32 + 32
    # A Dense layer on a batch of B: B*in*out multiply-adds (2 FLOPs each) and B*out bias adds.
    assert rows[("out",)].flops == 2 * 4 * 32 * 10 + 4 * 10
    assert s.opt_state == s.params and s.opt_state_bytes == 4 * s.params  # SGD momentum: one trace per param
    assert "blocks/0" in str(s)


def test_linen_rows_flops_memory_and_table():
    model, x = jnn.models.get("digits_cnn"), np.zeros((2, 8, 8, 1), np.float32)
    s = jnn.summary(model, x, tx=optax.adam(1e-3))
    rows = {r.path: r for r in s.rows}
    assert [r.path for r in s.rows][:3] == [(), ("conv_0",), ("conv_1",)]  # call order, the model first
    assert rows[("head",)].outputs == ("float32[2,10]",)
    assert rows[("head",)].flops == 2 * 2 * 128 * 10 + 2 * 10
    # A 3x3 'SAME' convolution on 8x8: XLA counts the taps inside the image, 3*8 - 2 = 22 per axis
    # (22*22 instead of 8*8*9), 2 FLOPs each per input-output channel pair, plus the bias per output.
    # (+2 under jnn's XLA option: the compare and add of the conditional that materializes the input.)
    assert rows[("conv_0",)].flops - 2 * (2 * 22 * 22 * 1 * 32) - 2 * 8 * 8 * 32 in ((0, 2) if compiler.options_active()
                                                                                  else (0,))
    assert s.flops == rows[()].flops >= sum(r.flops for r in s.rows[1:])
    assert sum(r.params for r in s.rows[1:]) == s.params  # every parameter sits in a leaf layer
    assert s.params_bytes == 4 * s.params
    assert s.opt_state == 2 * s.params + 1 and s.opt_state_bytes == 4 * s.opt_state  # adam: mu, nu, count
    text = str(s)
    assert "DigitsCNN on float32[2,8,8,1]" in text and "params: 151,306 (591.04 KiB)" in text
    assert re.search(r"conv_1\s+Conv\s+float32\[2,8,8,64\]\s+18,496\s+\d", text)
    assert not s.loops


def test_depth_state_and_loops():
    state = jnn.create_train_state(jnn.models.get("resnet20", widths=(4, 8, 16)), optax.adam(1e-3),
                                   np.zeros((1, 32, 32, 3), np.float32), 0)
    shallow = jnn.summary(state, depth=1, flops=False)  # a TrainState knows its input shape
    assert shallow.inputs == ("float32[1,32,32,3]",) and max(len(r.path) for r in shallow.rows) == 1
    assert shallow.opt_state == 2 * shallow.params + 1  # the state's own optimizer
    assert shallow.model_state > 0 and shallow.flops is None
    lstm = jnn.summary(jnn.models.get("lstm_classifier"), jnn.models.example_input("lstm_classifier", 1))
    assert lstm.loops and "counts a loop's body once" in str(lstm)


def test_summary_errors():
    with pytest.raises(ValueError, match=r"summary: a model needs example inputs, e.g. summary\(model, x\[:1\]\)"):
        jnn.summary(jnn.models.get("digits_cnn"))
    with pytest.raises(ValueError, match="depth=-1; expected None"):
        jnn.summary(jnn.models.get("digits_cnn"), np.zeros((1, 8, 8, 1), np.float32), depth=-1)
    with pytest.raises(ValueError, match="expected a flax.linen.Module or a flax.nnx.Module, got str"):
        jnn.summary("digits_cnn", np.zeros((1, 8, 8, 1), np.float32))


def test_jnn_models_summary_command(capsys):
    assert cli.main(["models", "vit_digits", "--summary", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "ViT on float32[2,8,8,1]" in out and "optimizer state: 36,437" in out and "forward FLOPs" in out
    assert cli.main(["models", "--summary"]) == 2
    assert "expected `jnn models NAME --summary`" in capsys.readouterr().err
