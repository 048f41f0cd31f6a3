"""A character-level LSTM language model (Karpathy's char-rnn), then ~200 sampled characters.

  python examples/lstm_char.py --data-dir input.txt         # any UTF-8 text file, e.g. tiny Shakespeare
  python examples/lstm_char.py                              # the Python standard library's source as text
  python examples/lstm_char.py --debug                      # 1 layer of 32, windows of 32, 8 steps
  python examples/lstm_char.py --temperature 0.5 --num-chars 500 --set model.hidden_size=512

Trains `lstm_char_lm` (embedding 64, 2 LSTM layers of 256) with Adam 2e-3 and gradient clipping on
windows of data.seq_len = 128 characters, each read from a zero state, and reports the test split's
loss in bits per character. Sampling puts the model in the same condition as in training: it reads
the last `seq_len` characters from a zero state and draws the next one from
softmax(logits / temperature), in one compiled `jax.lax.fori_loop`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/_char_lm.py, when imported
import _char_lm  # noqa: E402

PRESET = "lstm_char"


def parse_args(argv=None) -> argparse.Namespace:
    return _char_lm.parse_args(__doc__.splitlines()[0], argv)


def main(argv=None) -> dict:
    """Trains the LSTM, evaluates it on the test text, samples; returns losses and the sample."""
    return _char_lm.run(PRESET, parse_args(argv))


if __name__ == "__main__":
    main()
