"""Batches from in-memory arrays on grain: shuffle, shard, augment, prefetch, resume.

Design: grain iterates over *batch indices*, not examples. Element `i` of the grain dataset is the
whole batch for global step `i`, gathered from the arrays with one numpy fancy-index and augmented
with one vectorised call. Grain's per-element cost (~10 us) is then paid once per batch instead of
once per example, which is the difference between ~8k and ~1M examples/s on 8x8 digits.

Every batch is a pure function of (data, seed, shard, step):
  epoch, b = divmod(step, steps_per_epoch)
  order    = permutation(seed, epoch)            # the same on every host
  shard    = order[shard_index::shard_count]     # disjoint, together cover the epoch
  batch    = augment(data[shard[b*B:(b+1)*B]], rng(seed, shard_index, step))
so the iterator's whole state is the next step, `{"next_index": step}`, and a resumed run sees
exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence

import grain
import numpy as np

from jnn.data._augment import Augment, compose
from jnn.data._errors import DataError

Batch = dict[str, np.ndarray]

# Separates the augmentation rng stream from the shuffling stream of the same seed.
_AUGMENT_STREAM = 1


class Pipeline:
    """An epoch-aware, shardable, resumable batch pipeline over in-memory arrays, on grain.

    Iterate it for a `grain.DatasetIterator` whose `get_state()` is a JSON-serialisable dict and
    whose `set_state()` resumes at that exact batch. Each `iter()` starts from step 0.

    Example:
      >>> splits = jnn.data.load("digits")
      >>> train = Pipeline(splits.train, 128, seed=0)           # shuffled, forever
      >>> it = iter(train)
      >>> batch = next(it)                                      # {"inputs": (128, 8, 8, 1), ...}
      >>> state = it.get_state()                                # {"next_index": 1}
      >>> it2 = iter(train); it2.set_state(state)               # next(it2) == next(it)
      >>> for batch in Pipeline(splits.test, 256, train=False): pass   # one ordered pass

    Multi-host: each process passes its own `shard_index` (default `jax.process_index()`) and gets
    `batch_size` examples per step, disjoint from every other process's; the global batch is
    `batch_size * shard_count`. With `drop_remainder=True` every shard has the same number of steps.
    Without it (eval), shards may differ by one example, hence possibly by one (partial) batch.
    """

    def __init__(
        self,
        data: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        train: bool = True,
        seed: int = 0,
        num_epochs: int | None = -1,
        shuffle: bool | None = None,
        drop_remainder: bool | None = None,
        augment: Augment | Sequence[Augment] | None = None,
        shard_index: int | None = None,
        shard_count: int | None = None,
        num_threads: int | None = None,
        prefetch: int = 4,
        worker_count: int = 0,
    ):
        """Configures the pipeline; reads nothing yet.

        Args:
          data: arrays sharing their first dimension N, e.g. `splits.train`. Every key is batched.
          batch_size: examples per batch on this process (shard).
          train: sets the defaults: shuffle, drop the last partial batch and repeat forever
            (train=True); or one ordered pass keeping the last partial batch (train=False).
          seed: chooses the per-epoch permutations and the augmentation randomness; >= 0.
          num_epochs: passes over the data; None repeats forever; -1 (default) means None
            for train and 1 for eval.
          shuffle: reshuffle every epoch (default: `train`).
          drop_remainder: drop each epoch's last partial batch (default: `train`).
          augment: `aug(batch, rng) -> batch` or a sequence of them (see `jnn.data.RandomCrop`);
            also the place for `Normalize` in eval pipelines.
          shard_index: this process's shard; default `jax.process_index()`.
          shard_count: number of shards; default `jax.process_count()`.
          num_threads: grain threads computing batches ahead (0: compute on `next()`). Default: 0 on
            machines with 2 or fewer cores, where a prefetch thread only competes with the train
            step (measured in `benchmarks/studies/README.md`), else 1.
          prefetch: batches grain keeps ready ahead of the consumer.
          worker_count: grain multiprocessing workers (0: none; threads suffice for numpy work and
            keep the state format `{"next_index": step}`).

        Raises:
          DataError: bad arrays or arguments, or fewer examples per shard than one batch.
        """
        self.data = _check_data(data)
        self.num_examples = len(_leaves(self.data)[0])
        if not (isinstance(batch_size, (int, np.integer)) and batch_size >= 1):
            raise DataError(f"expected batch_size to be a positive integer, got {batch_size!r}.")
        if not (isinstance(seed, (int, np.integer)) and seed >= 0):
            raise DataError(f"expected seed to be a non-negative integer, got {seed!r}.")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.drop_remainder = train if drop_remainder is None else drop_remainder
        self.num_epochs = (None if train else 1) if num_epochs == -1 else num_epochs
        if self.num_epochs is not None and self.num_epochs < 1:
            raise DataError(f"expected num_epochs >= 1 or None (forever), got {num_epochs}.")
        self.augment = compose(augment)
        self.shard_index, self.shard_count = _shard(shard_index, shard_count)
        if num_threads is None:
            num_threads = 0 if (os.cpu_count() or 1) <= 2 else 1
        self.num_threads, self.prefetch, self.worker_count = num_threads, prefetch, worker_count

        usable = self.num_examples
        if self.drop_remainder:  # equal shards: drop the same count from every epoch's order
            usable = (self.num_examples // self.shard_count) * self.shard_count
        # Examples of this shard per epoch: positions shard_index, shard_index + count, ...
        self.shard_size = len(range(self.shard_index, usable, self.shard_count))
        if self.drop_remainder:
            self.steps_per_epoch = self.shard_size // self.batch_size
        else:
            self.steps_per_epoch = -(-self.shard_size // self.batch_size)
        if self.shard_size == 0:
            raise DataError(
                f"expected examples to batch, got {self.num_examples} examples split over "
                f"{self.shard_count} shard(s), none for shard {self.shard_index}. Fix: skip empty "
                "splits (e.g. val with val_fraction=0), or use fewer shards."
            )
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.num_examples} examples give shard {self.shard_index} of {self.shard_count} "
                f"{self.shard_size} examples per epoch, fewer than one batch of {self.batch_size}. "
                "Fix: lower batch_size, or pass drop_remainder=False."
            )
        self._lock = threading.Lock()
        self._orders: dict[int, np.ndarray] = {}

    @property
    def num_steps(self) -> int | None:
        """Total batches (`steps_per_epoch * num_epochs`), or None when repeating forever."""
        return None if self.num_epochs is None else self.steps_per_epoch * self.num_epochs

    def position(self, step: int) -> tuple[int, int]:
        """Returns `(epoch, batch_in_epoch)` of global `step` (e.g. `get_state()["next_index"]`)."""
        return divmod(int(step), self.steps_per_epoch)

    def _order(self, epoch: int) -> np.ndarray:
        """This shard's example indices for `epoch` (cached; epochs are read in order)."""
        with self._lock:
            order = self._orders.get(epoch)
        if order is not None:
            return order
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        else:
            order = np.arange(self.num_examples)
        if self.drop_remainder:
            order = order[: (self.num_examples // self.shard_count) * self.shard_count]
        order = order[self.shard_index :: self.shard_count]
        with self._lock:
            self._orders[epoch] = order
            for old in [e for e in self._orders if e < epoch - 1]:  # keep 2 for prefetch threads
                del self._orders[old]
        return order

    def batch(self, step: int) -> Batch:
        """Returns the batch of global `step`: a pure function of the configuration and `step`."""
        epoch, b = self.position(step)
        indices = self._order(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        batch = _tree_map(lambda value: np.take(value, indices, axis=0), self.data)
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, self.shard_index, int(step)])
            batch = self.augment(batch, rng)
        return batch

    def dataset(self) -> grain.IterDataset:
        """The grain pipeline: batch indices -> batches, with thread (or process) prefetching."""
        steps = grain.MapDataset.range(self.steps_per_epoch)
        if self.num_epochs != 1:
            steps = steps.repeat(self.num_epochs)  # None: forever
        batches = steps.map_with_index(_BatchAt(self))
        ds = batches.to_iter_dataset(
            grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)
        )
        if self.worker_count > 0:
            _allow_unparsed_absl_flags()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count))
        return ds

    def __iter__(self) -> grain.DatasetIterator:
        return iter(self.dataset())

    def numpy_iterator(self) -> NumpyIterator:
        """A grain-free iterator over the same batches, with the same `{"next_index"}` state.

        For code that wants no background threads; the default path is `iter(pipeline)`.
        """
        return NumpyIterator(self)

    def __getstate__(self):
        # Locks do not pickle; grain's multiprocessing workers get a copy without the cache.
        state = self.__dict__.copy()
        del state["_lock"], state["_orders"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._orders = {}

    def __repr__(self) -> str:
        return (
            f"Pipeline(num_examples={self.num_examples}, batch_size={self.batch_size}, "
            f"steps_per_epoch={self.steps_per_epoch}, num_epochs={self.num_epochs}, "
            f"shuffle={self.shuffle}, drop_remainder={self.drop_remainder}, "
            f"shard={self.shard_index}/{self.shard_count}, augment={self.augment!r})"
        )


class _BatchAt:
    """grain map_with_index transform: (global step, unused element) -> batch. Picklable."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def __call__(self, step: int, _) -> Batch:
        return self.pipeline.batch(step)


class NumpyIterator(grain.DatasetIterator):
    """`Pipeline.numpy_iterator()`: batches made on `next()`, no threads, grain-compatible state.

    A `grain.DatasetIterator`, so `grain.checkpoint.CheckpointSave/Restore` accept it too.
    """

    def __init__(self, pipeline: Pipeline):
        super().__init__()
        self._pipeline = pipeline
        self._next_index = 0

    def __next__(self) -> Batch:
        total = self._pipeline.num_steps
        if total is not None and self._next_index >= total:
            raise StopIteration
        batch = self._pipeline.batch(self._next_index)
        self._next_index += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next_index": self._next_index}

    def set_state(self, state: Mapping[str, int]) -> None:
        self._next_index = int(state["next_index"])


def _tree_map(fn, tree):
    import jax  # deferred: the data module does not need JAX to import

    return jax.tree.map(fn, tree)


def _leaves(tree) -> list:
    import jax

    return jax.tree.leaves(tree)


def _check_data(data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The data as numpy arrays; an entry may be a pytree (e.g. inputs as a tuple or dict of arrays)."""
    import jax

    if not isinstance(data, Mapping) or not data:
        raise DataError(
            "expected data as a non-empty dict of arrays, e.g. {'inputs': x, 'labels': y}, "
            f"got {type(data).__name__}."
        )
    from jnn.train.batch import check_numeric  # noqa: PLC0415 - one rule for pipelines and steps

    arrays = _tree_map(np.asarray, dict(data))
    for path, leaf in jax.tree_util.tree_leaves_with_path(arrays):
        check_numeric(leaf, "data" + jax.tree_util.keystr(path), "Pipeline", error=DataError)
    lengths = {jax.tree_util.keystr(path): (len(a) if a.ndim else None)
               for path, a in jax.tree_util.tree_leaves_with_path(arrays)}
    if not lengths or len(set(lengths.values())) != 1 or None in lengths.values():
        raise DataError(f"expected arrays with one shared first dimension, got lengths {lengths}.")
    return arrays


def _allow_unparsed_absl_flags() -> None:
    """Works around grain 0.2.18's mp_prefetch reading an absl flag before flags are parsed.

    Scripts that do not run under `absl.app` otherwise fail with UnparsedFlagAccessError
    (google/grain#1355, fixed after 0.2.18). Only marks flags parsed when nobody has parsed them.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # deferred: only multi-host defaults need it

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not (shard_count >= 1 and 0 <= shard_index < shard_count):
        raise DataError(
            f"expected 0 <= shard_index < shard_count, got shard_index={shard_index}, "
            f"shard_count={shard_count}."
        )
    return int(shard_index), int(shard_count)
