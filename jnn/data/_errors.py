"""Errors raised by jnn.data for problems a user can cause (missing, corrupt or invalid data)."""

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
