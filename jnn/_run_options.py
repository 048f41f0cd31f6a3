"""A config's toolbox options, turned into what `jnn.experiment` runs: the train step
(plain or adversarial), fine-tuning (`train.init_from`, LoRA), multi-process data parallelism,
and the extra test metrics (robust accuracy, int8 accuracy) with their report lines."""
from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np

from jnn import adversarial as adversarial_lib
from jnn import lora as lora_lib
from jnn import quantize as quantize_lib
from jnn import transfer as transfer_lib
from jnn.config import Config
from jnn.train.loop import evaluate
from jnn.train.state import TrainState
from jnn.train.step import make_train_step


def attack_of(config: Config) -> adversarial_lib.PGD | None:
    """The adversarial attack a config trains against (None without `train.adversarial`)."""
    t = config.train
    if t.adversarial is None:
        return None
    clip = None if config.data.normalize else (0.0, 1.0)  # jnn's image loaders scale to [0, 1]
    if t.adversarial == "fgsm":
        return adversarial_lib.fgsm(t.adversarial_epsilon, clip=clip)
    return adversarial_lib.PGD(t.adversarial_epsilon, steps=t.adversarial_steps, norm=t.adversarial_norm, clip=clip)


def train_step_of(config: Config, loss_fn: Callable) -> Callable:
    """The config's train step, before jit: non-finite steps skipped as `fit` does, adversarial
    under `train.adversarial`."""
    attack = attack_of(config)
    if attack is None:
        return make_train_step(loss_fn, on_nonfinite="skip")
    return adversarial_lib.make_adversarial_train_step(loss_fn, attack, mix=config.train.adversarial_mix,
                                                       on_nonfinite="skip")


def fine_tuning(config: Config, state: TrainState, note: str | None) -> tuple[TrainState, str | None]:
    """`train.init_from` (pretrained weights, new layers kept) and `train.lora_rank` (adapters)."""
    t, notes = config.train, [note] if note else []
    if t.init_from:
        state, report = transfer_lib.load_pretrained(state, t.init_from, skip_mismatched=True)
        lines = str(report).splitlines()
        notes.append(f"initialised from {t.init_from}: {lines[0]}" + "".join(f"; {line.strip()}" for line in lines[1:]))
    if t.lora_rank:
        state = lora_lib.apply(state, lora_lib.LoRA(t.lora_rank, t.lora_alpha, tuple(t.lora_targets)), state.tx)
        notes.append(f"LoRA rank {t.lora_rank}: {lora_lib.trainable_count(state):,} trainable parameters")
    return state, "\n".join(notes) or None


def across_processes(train_step, eval_step, state):
    """A multi-process run (`jax.distributed` initialised): data parallel over every device.

    Each process loads its own block of every batch (the train Pipeline's default shard is the
    process index, so `data.batch_size` is per process) and the step is `parallel.data_parallel`
    over all devices (replicated state). Evaluation needs no collective: every process evaluates
    the whole split on its own replica (`local_eval`), so every process takes the same
    early-stopping and best-checkpoint decisions. Metrics come back as this process's copy.
    """
    from jnn import parallel

    step = parallel.data_parallel(train_step, parallel.make_mesh())

    def distributed_step(state, batch):
        state, metrics = step(state, step.shard_batch(batch))
        return state, local(metrics)

    return distributed_step, local_eval(eval_step), step.shard_state(state)


def local(tree):
    """This process's copy of every replicated array of `tree` (tracers and local arrays as they are)."""
    def copy(x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable:
            return x.addressable_shards[0].data
        return x

    return jax.tree.map(copy, tree)


def local_eval(eval_step: Callable) -> Callable:
    """`eval_step` on this process's replica of a (possibly multi-process) state."""
    if jax.process_count() == 1:
        return eval_step
    return lambda state, batch: eval_step(local(state), batch)


def test_extras(config: Config, loss_fn: Callable, state: TrainState, test_data: Callable[[], Iterable]) -> dict:
    """The test metrics the options add: accuracy and loss under the training attack
    (`adversarial_*`), the int8 model's accuracy and size (`int8_*`, `float_bytes`)."""
    extras = {}
    attack = attack_of(config)
    if attack is not None:
        step = local_eval(jax.jit(adversarial_lib.make_robust_eval_step(loss_fn, attack)))
        robust = evaluate(state, test_data(), step)
        extras.update({f"adversarial_{k}": v for k, v in robust.items() if k in ("accuracy", "loss")})
    if config.train.quantize is not None:
        quantized = quantize_lib.ptq(local(state))
        correct = total = 0
        for batch in test_data():
            correct += int((np.asarray(quantized(batch["inputs"])).argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
        extras.update(int8_accuracy=correct / total, int8_bytes=quantized.nbytes,
                      float_bytes=quantized.float_nbytes)
    return extras


def report_lines(config: Config, test: dict) -> str:
    """The test report's lines for `test_extras`' metrics (empty without them)."""
    text = ""
    if "int8_accuracy" in test:
        text += (f"\nint8 (qwix PTQ, w8a8): accuracy {test['int8_accuracy']:.4f}, parameters "
                 f"{test['float_bytes']:,} -> {test['int8_bytes']:,} bytes")
    if "adversarial_accuracy" in test:
        text += (f"\nunder the training attack ({config.train.adversarial}, epsilon "
                 f"{config.train.adversarial_epsilon}): accuracy {test['adversarial_accuracy']:.4f}")
    return text
