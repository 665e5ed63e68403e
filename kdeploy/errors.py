"""Domain errors. Each carries the process exit code the CLI maps it to."""


class KdeployError(Exception):
    """Base class; `exit_code` is what `kdeploy` exits with when this reaches the CLI."""

    exit_code = 3


class UsageError(KdeployError):
    """Bad input or usage: unreadable/unsafe model, bad profile, bad data, bad flags."""

    exit_code = 2


class ModelLoadError(UsageError):
    """The model file could not be read as a model, or was refused as unsafe."""


class UnsafeModelError(ModelLoadError):
    """The model would run code it was not told to trust."""


class ProfileError(UsageError):
    """A target profile is unknown or invalid."""


class DataError(UsageError):
    """Input data does not fit the model."""


class ConversionError(KdeployError):
    """A converter failed on a model it should handle (exit 3 when nothing could be built)."""

    exit_code = 3


class ManifestError(UsageError):
    """A batch manifest is unreadable or invalid."""


class MemoryLimitError(KdeployError):
    """The run's resident memory (all its processes) went above `--max-memory`; stopped cleanly (exit 3)."""

    exit_code = 3
