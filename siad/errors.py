"""Exceptions raised by the suite.

Every error a user can trigger with bad input derives from :class:`SiadError`, so the workflow
scripts can print one clean message (the file and the fix) instead of a traceback.
"""

from __future__ import annotations


class SiadError(Exception):
    """Base class of every user-facing error of the suite."""


class ConfigError(SiadError):
    """The configuration is malformed or inconsistent."""


class UnknownNameError(SiadError, KeyError):
    """A dataset, method, backbone or other registered name does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(SiadError):
    """An input file or folder is missing, unreadable or inconsistent (names the file and the fix)."""


class ChecksumError(DataError):
    """A downloaded or supplied archive does not have the expected SHA-256."""


class ManualDownloadRequired(DataError):
    """A dataset cannot be fetched automatically; the message says what to fetch and where to put it."""


class MissingWeightsError(SiadError):
    """Pretrained weights are not in the cache and cannot be downloaded (offline)."""


class LeakageError(SiadError):
    """A run would evaluate on a dataset the model saw during training."""


class NumericalError(SiadError):
    """A loss or a score became NaN or infinite."""
