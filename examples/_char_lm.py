"""What the two character-level language-model examples share: arguments, training, sampling.

`gpt_char.py` and `lstm_char.py` differ only in their preset; both call `run(PRESET, args)`.
"""
from __future__ import annotations

import argparse
import math
import os

import jax

import jnn
from jnn import cli, experiment


def parse_args(description: str, argv=None) -> argparse.Namespace:
    p = cli.add_run_arguments(argparse.ArgumentParser(description=description))
    p.add_argument("--num-chars", type=int, default=200, help="characters to sample after training")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (> 0)")
    return p.parse_args(argv)


def run(preset: str, args: argparse.Namespace) -> dict:
    """Trains the preset's model, evaluates it on the test text, samples; returns losses and the sample."""
    config = cli.config_from_args(preset, args)
    run_dir = args.run_dir or cli.default_run_dir(preset, args.debug)
    exp = experiment.build(config)  # text windows (B, T) -> next characters (B, T); the model; the optimizer
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

