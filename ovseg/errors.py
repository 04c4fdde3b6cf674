"""Errors for user mistakes: each names what is wrong and what to do; the CLIs print one line."""


class OvsegError(Exception):
    """Base class of the errors a user can fix (bad config, input, weights, vocabulary)."""


class ConfigError(OvsegError, ValueError):
    """A config file or override is wrong: unknown key, wrong type, bad value."""


class WeightsError(OvsegError, RuntimeError):
    """Weights cannot be found, fetched or loaded into the architecture."""


class VocabularyError(OvsegError, ValueError):
    """A vocabulary is empty or has an empty entry."""


class ImageReadError(OvsegError, OSError):
    """An input image cannot be read or decoded."""


class DatasetError(OvsegError):
    """A benchmark is unknown, its files are missing or a label file holds invalid values."""


class WriteError(OvsegError, OSError):
    """An output cannot be written: no space left on the device, a read-only folder, a file
    where a folder should be."""
