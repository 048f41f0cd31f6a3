"""jnn.data: data sources (digits, MNIST, CIFAR-10, npz, synthetic, text) and grain pipelines.

Sources return `Splits` of numpy arrays; `Pipeline` turns one split into shuffled, sharded,
augmented, prefetched batches `{"inputs": (B, ...), "labels": (B, ...)}` whose iterator position
can be checkpointed (`it.get_state()` / `it.set_state(state)`).
"""

from jnn.data._augment import Compose as Compose
from jnn.data._augment import Mixup as Mixup
from jnn.data._augment import Normalize as Normalize
from jnn.data._augment import RandomCrop as RandomCrop
from jnn.data._augment import RandomFlip as RandomFlip
from jnn.data._augment import channel_stats as channel_stats
from jnn.data._cifar import load_cifar10 as load_cifar10
from jnn.data._digits import load_digits as load_digits
from jnn.data._errors import DataError as DataError
from jnn.data._errors import MissingDataError as MissingDataError
from jnn.data._mnist import load_mnist as load_mnist
from jnn.data._mnist import read_idx as read_idx
from jnn.data._npz import load_npz as load_npz
from jnn.data._pipeline import NumpyIterator as NumpyIterator
from jnn.data._pipeline import Pipeline as Pipeline
from jnn.data._sources import NAMES as NAMES
from jnn.data._sources import load as load
from jnn.data._splits import Splits as Splits
from jnn.data._synthetic import load_synthetic as load_synthetic
from jnn.data._synthetic import synthetic_arrays as synthetic_arrays
from jnn.data._text import decode_text as decode_text
from jnn.data._text import encode_text as encode_text
from jnn.data._text import load_text as load_text

__all__ = [
    "NAMES",
    "Compose",
    "DataError",
    "MissingDataError",
    "Mixup",
    "Normalize",
    "NumpyIterator",
    "Pipeline",
    "RandomCrop",
    "RandomFlip",
    "Splits",
    "channel_stats",
    "decode_text",
    "encode_text",
    "load",
    "load_cifar10",
    "load_digits",
    "load_mnist",
    "load_npz",
    "load_synthetic",
    "load_text",
    "read_idx",
    "synthetic_arrays",
]
