"""The library's exceptions. Each is a problem with what the user gave (a file, a setting, a
checkpoint), worded as one line that names the thing and the problem; the command line prints
it as ``error: ...`` and exits with code 2. Anything else is a bug and keeps its traceback."""


class FmfastError(Exception):
    """Base class: a problem with the user's input, reported as one line."""


class DataError(FmfastError, ValueError):
    """A data file (dataset, recording, log) is missing or malformed. ``DataError(path, problem)``
    reads ``"<path>: <problem>"``; ``DataError(message)`` takes a message that names its file."""

    def __init__(self, path, problem: str | None = None):
        self.path = str(path) if problem is not None else None
        self.problem = problem if problem is not None else str(path)
        super().__init__(f"{self.path}: {problem}" if problem is not None else str(path))


class DecodeError(DataError):
    """A video could not be decoded (corrupt, truncated, unsupported)."""


class CheckpointError(FmfastError, ValueError):
    """A checkpoint that cannot be read or does not fit what is asked of it."""


class SettingsError(FmfastError, ValueError):
    """A setting or option with a value that cannot be used (unknown name, out of range,
    not available on this machine)."""


class CheckpointMismatch(CheckpointError):
    """A state_dict whose keys or shapes do not fit the model asked for."""


class ExportError(FmfastError):
    """An exported model that, loaded back by its own runtime, does not reproduce PyTorch's outputs."""


class OutputError(FmfastError, OSError):
    """An output that cannot be written: the location is not a folder (or not a regular file),
    is read-only, full, or held by another run."""


class TrainingError(FmfastError):
    """A training run that cannot go on (a loss or the weights became non-finite)."""


class DataWarning(UserWarning):
    """Input that was used, but not all of it (a truncated video kept in part): the command
    line prints it as one ``warning: ...`` line."""
