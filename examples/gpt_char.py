"""A character-level GPT (nanoGPT's shakespeare_char recipe, scaled down), then ~200 sampled characters.

  python examples/gpt_char.py --data-dir input.txt          # any UTF-8 text file, e.g. tiny Shakespeare
  python examples/gpt_char.py                               # the Python standard library's source as text
  python examples/gpt_char.py --debug                       # 1 layer, context 32, 8 steps, in seconds
  python examples/gpt_char.py --temperature 0.5 --num-chars 500 --set train.steps=6000

Trains `gpt_char_tiny` (2 layers, 2 heads, width 64, context = data.seq_len = 64) with AdamW,
warm-up + cosine decay and gradient clipping, reports the test split's loss in bits per character,
then samples: the model reads the last `seq_len` characters (its whole context) and draws the next
one from softmax(logits / temperature), in one compiled `jax.lax.fori_loop`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # examples/_char_lm.py, when imported
import _char_lm  # noqa: E402

PRESET = "gpt_char"


def parse_args(argv=None) -> argparse.Namespace:
    return _char_lm.parse_args(__doc__.splitlines()[0], argv)


def main(argv=None) -> dict:
    """Trains the GPT, evaluates it on the test text, samples; returns losses and the sample."""
    return _char_lm.run(PRESET, parse_args(argv))


if __name__ == "__main__":
    main()
