"""Exceptions a user can act on.

Each carries a message that names the offending field, file or tensor and says
what was expected. They subclass ValueError/RuntimeError so that generic
handlers (mergekit's, click's) still recognise them.
"""


class AimError(Exception):
    """Base class of every error mergekit-aim raises on purpose."""


class AimConfigError(AimError, ValueError):
    """The `aim:` block, a CLI option or an API argument is invalid."""


class ImportanceError(AimError, ValueError):
    """An importance artifact is corrupt or does not belong to the base model."""


class CalibrationDataError(AimError, RuntimeError):
    """Calibration text could not be read, reached or packed into blocks."""


class CalibrationError(AimError, RuntimeError):
    """The base model could not be calibrated (loading, hooks, forward)."""


class TextFileError(AimConfigError, CalibrationDataError):
    """A text file given as calibration or eval data cannot be read.

    Both an invalid argument and unreadable calibration data, so that the
    handlers of either catch it.
    """


class ShapeMismatchError(ImportanceError):
    """A merged tensor does not fit its base tensor or its statistic (shape,
    channel count, number of experts); the message names the tensor and what
    was expected. Raised only by :func:`mergekit_aim.relaxation.mismatch`."""


class OutputError(AimError, RuntimeError):
    """An output cannot be written there: not writable, or not enough space."""


class NonFiniteError(AimError, ValueError):
    """A model to be written holds NaN or Inf values."""
