"""Run configuration: five small dataclasses, overridable from the command line, saved as JSON.

`--set optim.learning_rate=3e-4` sets a field; values are parsed as Python literals and coerced to
the field's type. `model.<attr>=...` for any other name than `model.name` sets a model attribute
(checked when the model is built). Unknown sections or keys list the valid ones.
"""
from __future__ import annotations

import ast
import dataclasses
import json
from typing import Any, Iterable, Mapping

from jnn._names import unknown
from jnn._names import check_fields
from jnn.optim import OptimConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """What to train: a model of the zoo.

    Attributes:
      name: a `jnn.models.names()` preset.
      kwargs: attribute overrides for the model (`num_classes`/`vocab_size` are filled from the data).
    """

    name: str = "digits_cnn"
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on: the data set, its splits, batches and augmentation.

    Attributes:
      name: a `jnn.data.load` name ("digits", "mnist", "cifar10", "npz:<path>", "synthetic", "text").
      data_dir: where the files are (mnist, cifar10; a file for npz/text). When None for mnist or
        cifar10, the bundled digits are used instead, resized to `input_shape`.
      input_shape: per-example image shape the model expects; the digits fallback is resized to it.
      batch_size / eval_batch_size: examples per train / eval batch (per process).
      val_fraction: share of train held out for validation (None: the source's default).
      seed: splits, shuffling and augmentation.
      augment: any of "crop" (pad `crop_padding` + random crop), "flip" (horizontal).
      crop_padding: pixels of padding for "crop" (4 for 32x32 CIFAR; 1 for 8x8 digits).
      normalize: subtract the per-channel mean and divide by the std of the train split.
      mixup: mixup alpha (0: off). Labels become soft one-hot vectors.
      seq_len: tokens per example for text.
    """

    name: str = "digits"
    data_dir: str | None = None
    input_shape: tuple[int, ...] | None = None
    batch_size: int = 64
    eval_batch_size: int = 500
    val_fraction: float | None = None
    seed: int = 0
    augment: tuple[str, ...] = ()
    crop_padding: int = 4
    normalize: bool = False
    mixup: float = 0.0
    seq_len: int = 128

    def __post_init__(self):
        check_fields("DataConfig", self, {
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "eval_batch_size": (self.eval_batch_size >= 1, ">= 1"),
            "val_fraction": (self.val_fraction is None or 0 < self.val_fraction < 1, "in (0, 1) or None"),
            "crop_padding": (self.crop_padding >= 0, ">= 0"),
            "mixup": (self.mixup >= 0, ">= 0"),
            "seq_len": (self.seq_len >= 1, ">= 1"),
            "seed": (self.seed >= 0, ">= 0"),
            "augment": (set(self.augment) <= {"crop", "flip"}, "a subset of ('crop', 'flip')"),
        })


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train: steps, evaluation, checkpoints, loss, precision and the toolbox options.

    Attributes:
      steps: total optimizer steps.
      eval_every: evaluate on the validation split every this many steps (and at the end).
      log_every: write averaged train metrics every this many steps.
      seed: parameter initialisation and dropout.
      loss: a `jnn.losses` name.
      label_smoothing: for the cross-entropy losses.
      early_stopping: evaluation metric to stop on (None: off), with `patience` evaluations.
      best_metric / best_mode: which checkpoint is "best" (also used for the final test).
      keep: most recent checkpoints kept.
      compute_dtype: "float32" or "bfloat16": the zoo model's own `dtype` (params stay float32).
      precision: a `jnn.precision` policy name for any model: "float32", "mixed_bf16" or
        "mixed_f16" (float16 with dynamic loss scaling).
      adversarial: train on adversarial examples: "pgd" or "fgsm" (None: off; `jnn.adversarial`).
        The final test report adds the accuracy under the same attack.
      adversarial_epsilon / adversarial_norm / adversarial_steps: the attack's radius, norm
        ("linf" or "l2") and PGD steps (inputs are kept in [0, 1] unless data.normalize).
      adversarial_mix: the fraction of each batch replaced by adversarial examples.
      init_from: pretrained weights to start from (`jnn.transfer.load_pretrained`): a run
        directory, a checkpoint folder, or a .msgpack / .safetensors / .npz file; arrays whose path
        and shape match are loaded, the others (a new head) keep their initialisation.
      lora_rank / lora_alpha / lora_targets: fine-tune through LoRA adapters of this rank (0: off;
        `jnn.lora`); targets are path patterns (default: every kernel).
      qat: train with int8 fake quantization (`jnn.quantize.qat`, qwix).
      quantize: "int8": quantize the final model after training (`jnn.quantize.ptq`, w8a8) and add
        its test accuracy and size to the report; None: off.
    """

    steps: int = 600
    eval_every: int = 100
    log_every: int = 50
    seed: int = 0
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    early_stopping: str | None = None
    patience: int = 5
    best_metric: str = "accuracy"
    best_mode: str = "max"
    keep: int = 2
    compute_dtype: str = "float32"
    precision: str = "float32"
    adversarial: str | None = None
    adversarial_epsilon: float = 0.1
    adversarial_norm: str = "linf"
    adversarial_steps: int = 7
    adversarial_mix: float = 1.0
    init_from: str | None = None
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ()
    qat: bool = False
    quantize: str | None = None

    def __post_init__(self):
        check_fields("TrainConfig", self, {
            "steps": (self.steps >= 1, ">= 1"),
            "eval_every": (self.eval_every >= 1, ">= 1"),
            "log_every": (self.log_every >= 1, ">= 1"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "patience": (self.patience >= 1, ">= 1"),
            "best_mode": (self.best_mode in ("max", "min"), "'max' or 'min'"),
            "keep": (self.keep >= 1, ">= 1"),
            "compute_dtype": (self.compute_dtype in COMPUTE_DTYPES, f"one of {list(COMPUTE_DTYPES)}"),
            "precision": (self.precision in _precision_names(), f"one of {_precision_names()}"),
            "adversarial": (self.adversarial in (None, "pgd", "fgsm"), "'pgd', 'fgsm' or None"),
            "adversarial_epsilon": (self.adversarial_epsilon > 0, "> 0"),
            "adversarial_norm": (self.adversarial_norm in ("linf", "l2"), "'linf' or 'l2'"),
            "adversarial_steps": (self.adversarial_steps >= 1, ">= 1"),
            "adversarial_mix": (0 <= self.adversarial_mix <= 1, "in [0, 1]"),
            "lora_rank": (self.lora_rank >= 0, ">= 0 (0: no LoRA)"),
            "lora_alpha": (self.lora_alpha > 0, "> 0"),
            "quantize": (self.quantize in (None, "int8"), "'int8' or None"),
        })


def _precision_names() -> list[str]:
    from jnn.precision import POLICIES  # noqa: PLC0415 - jnn.precision imports jnn.optim, as this module does

    return list(POLICIES)


TRACKERS = ("wandb", "mlflow")
WANDB_MODES = ("offline", "online", "disabled")


@dataclasses.dataclass(frozen=True)
class LogConfig:
    """Where a run is logged besides its run directory (`jnn.writers.WandbWriter`, `MlflowWriter`).

    Attributes:
      writers: trackers: any of "wandb", "mlflow" (`--set log.writers=wandb,mlflow`; each needs
        its package: `pip install "jnn[trackers]"`).
      project: the W&B project and the MLflow experiment.
      run_name: the run's name in the trackers (None: the run directory's name).
      wandb_mode: "offline" (written under RUN_DIR/wandb, uploaded later with `wandb sync`),
        "online" or "disabled".
      mlflow_tracking_uri: where MLflow logs: a database (`sqlite:///path/mlflow.db`), a
        directory (`file:///path/mlruns`), or a server (`http://host:5000`). None: MLflow's own
        default ($MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory).
      log_checkpoint: also upload the tested (best) checkpoint as an artifact.
    """

    writers: tuple[str, ...] = ()
    project: str = "jnn"
    run_name: str | None = None
    wandb_mode: str = "offline"
    mlflow_tracking_uri: str | None = None
    log_checkpoint: bool = False

    def __post_init__(self):
        names = (self.writers,) if isinstance(self.writers, str) else tuple(self.writers)
        # "wandb,mlflow" from the command line is one string: one name per comma.
        names = tuple(n.strip() for name in names for n in str(name).split(",") if n.strip())
        object.__setattr__(self, "writers", names)
        check_fields("LogConfig", self, {
            "writers": (set(names) <= set(TRACKERS) and len(set(names)) == len(names),
                        f"a subset of {TRACKERS}, each once, e.g. wandb,mlflow"),
            "wandb_mode": (self.wandb_mode in WANDB_MODES, f"one of {list(WANDB_MODES)}"),
            "project": (bool(self.project), "a non-empty name"),
        })


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: what to train, on what, with what optimizer, for how long, logged where."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "train": TrainConfig,
            "log": LogConfig}


def valid_keys() -> list[str]:
    """Every `section.field` that `--set` accepts (plus `model.<model attribute>`)."""
    keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls) if f.name != "kwargs"]
    return keys + ["model.<any model attribute>"]


def _parse(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Converts a parsed value to a dataclass field's annotated type."""
    hint = annotation if not isinstance(annotation, str) else None
    text = annotation if isinstance(annotation, str) else str(annotation)
    if value is None:
        if "None" in text:
            return None
        raise ValueError(f"--set {key}: None is not allowed; expected a value of type {text}.")
    if "tuple" in text:
        if isinstance(value, (str, int, float)):
            value = (value,)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"--set {key}: expected a tuple such as (1, 2); got {value!r}.")
        return tuple(value)
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name) or hint is typ:
            if typ is bool and not isinstance(value, bool):
                if str(value).lower() in ("true", "1", "yes"):
                    return True
                if str(value).lower() in ("false", "0", "no"):
                    return False
                raise ValueError(f"--set {key}: expected true or false; got {value!r}.")
            if typ is int and isinstance(value, float) and value.is_integer():
                return int(value)
            if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if typ is str:
                return str(value)
            if isinstance(value, typ) and not (typ is int and isinstance(value, bool)):
                return value
            raise ValueError(f"--set {key}: expected {name}; got {value!r}.")
    return value


def _field_type(cls, name: str) -> str:
    """The field's annotation as a string (modules here use `from __future__ import annotations`)."""
    return str({f.name: f.type for f in dataclasses.fields(cls)}[name])


def override(config: Config, assignments: Iterable[str]) -> Config:
    """Applies `section.key=value` strings to `config`.

    Raises:
      ValueError: a malformed assignment, an unknown section or key (listing the valid ones), or a
        value of the wrong type.
    """
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not field:
            raise ValueError(f"--set expects section.key=value, e.g. optim.learning_rate=3e-4; got {assignment!r}.")
        if section not in SECTIONS:
            raise unknown("config key", key.strip(), valid_keys(), "Fix: --set one of them, as section.key=value.")
        current = getattr(config, section)
        value = _parse(raw.strip())
        names = {f.name for f in dataclasses.fields(SECTIONS[section])}
        if section == "model" and field not in names:
            current = dataclasses.replace(current, kwargs={**current.kwargs, field: value})
        elif field not in names or field == "kwargs":
            raise unknown("config key", key.strip(), [k for k in valid_keys() if k.startswith(section + ".")],
                          "Fix: --set one of them, as section.key=value.")
        else:
            current = dataclasses.replace(current, **{field: _coerce(value, _field_type(SECTIONS[section], field), key)})
        config = dataclasses.replace(config, **{section: current})
    return config


def to_dict(config: Config) -> dict[str, Any]:
    """A JSON-serialisable dict of `config`."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(data: Mapping[str, Any]) -> Config:
    """Rebuilds a `Config` from `to_dict` output (e.g. a run directory's config.json).

    Raises:
      ValueError: on unknown sections or keys (e.g. a config written by another jnn version).
    """
    sections = {}
    for section, cls in SECTIONS.items():
        values = dict(data.get(section, {}))
        names = {f.name: f for f in dataclasses.fields(cls)}
        extra = sorted(set(values) - set(names))
        if extra:
            raise ValueError(f"config section {section!r} has unknown keys {extra}; valid: {sorted(names)}.")
        for name, value in values.items():
            if isinstance(value, list):
                values[name] = tuple(value)
            elif name == "kwargs":  # JSON has no tuples; model attributes such as stage_sizes are
                values[name] = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        sections[section] = cls(**values)
    extra = sorted(set(data) - set(SECTIONS))
    if extra:
        raise ValueError(f"config has unknown sections {extra}; valid: {sorted(SECTIONS)}.")
    return Config(**sections)
