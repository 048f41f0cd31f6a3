"""Errors raised by jnn.data for problems a user can cause (missing, corrupt or invalid data)."""
from __future__ import annotations

import os

# Said by every "missing data" error so the user knows there is a way forward without a download.
DIGITS_HINT = (
    "No download is needed to try jnn: `jnn train` works on the bundled scikit-learn "
    "'digits' data set (jnn.data.load('digits'))."
)


class DataError(ValueError):
    """A data set is missing, truncated, corrupt, or holds invalid values.

    The message names the file or array, what was expected, what was found, and the fix.
    """


class MissingDataError(DataError, FileNotFoundError):
    """The data directory or one of the files a source needs does not exist.

    Subclasses both `DataError` and `FileNotFoundError`, so either `except` clause catches it.
    """


def data_dir_or_raise(data_dir, name: str, title: str, expected: str, fix: str) -> str:
    """`data_dir` as a string, or a `MissingDataError` when it is None or not a directory.

    `fix` says where to get the files, with `{dir}` where the directory goes.
    """
    if data_dir is None:
        raise MissingDataError(f"{name} needs data_dir, a directory holding {expected}. " + fix.format(dir="it"))
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise MissingDataError(f"{title} data directory {data_dir!r} does not exist; expected it to hold "
                               f"{expected}. " + fix.format(dir=repr(data_dir)))
    return data_dir
