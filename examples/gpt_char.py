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
import math
import os

import jax

import jnn
from jnn import config as config_lib
from jnn import cli, experiment, presets

PRESET = "gpt_char"


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.add_run_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--num-chars", type=int, default=200, help="characters to sample after training")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (> 0)")
    return p.parse_args(argv)


def make_config(args: argparse.Namespace) -> config_lib.Config:
    """The preset (or its debug variant), its text file, then the --set overrides."""
    return presets.from_args(PRESET, debug=args.debug, data_dir=args.data_dir, assignments=args.set)


def main(argv=None) -> dict:
    """Trains the GPT, evaluates it on the test text, samples; returns losses and the sample."""
    args = parse_args(argv)
    config = make_config(args)
    run_dir = args.run_dir or cli.default_run_dir(PRESET, args.debug)
    exp = experiment.build(config)  # text windows (B, T) -> next characters (B, T); the model; AdamW
    vocab = exp.splits.info["vocab"]
    print(f"{exp.splits.info['num_chars']:,} characters from {exp.splits.info['source']}, vocabulary of {len(vocab)}")
    t = config.train
    eval_step = jax.jit(jnn.make_eval_step(exp.loss_fn))  # compiled once: validation and test
    with jnn.writers.make_run_writers(run_dir, console=True) as writer:  # metrics.jsonl, tb/, curves.png, stdout
        result = jnn.fit(exp.state, exp.train_data, num_steps=t.steps, loss_fn=exp.loss_fn,
                         eval_step=eval_step, eval_data=lambda: exp.eval_data("val"), eval_every=t.eval_every,
                         log_every=t.log_every, writer=writer)
    test = jnn.evaluate(result.state, exp.eval_data("test"), eval_step)
    print(f"test loss {test['loss']:.4f} ({test['loss'] / math.log(2):.3f} bits per character)")

    prompt = exp.splits.test["inputs"][0]  # (T,): the first window of the test text
    tokens = jnn.models.sample(result.state.apply_fn, result.state.variables, prompt, args.num_chars,
                               rng=jax.random.key(t.seed), temperature=args.temperature)
    text = jnn.data.decode_text(tokens, vocab)
    print(f"--- prompt ---\n{jnn.data.decode_text(prompt, vocab)}")
    print(f"--- sample (temperature {args.temperature}) ---\n{text}")
    with open(os.path.join(run_dir, "sample.txt"), "w", encoding="utf-8") as f:
        f.write(text)
    return {"run_dir": run_dir, "steps": int(result.state.step), "test": test, "vocab": vocab, "sample": text,
            "history": result.history}


if __name__ == "__main__":
    main()
