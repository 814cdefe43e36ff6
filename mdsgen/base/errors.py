"""Errors that name the file and the reason, for the CLI to print instead of a traceback."""


class MediaError(ValueError):
    """A media file cannot be used: no such stream, no frames, or undecodable."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


class CheckpointError(ValueError):
    """A checkpoint is missing parts or does not match the code that loads it."""


def describe(err: Exception) -> str:
    """FFmpeg's reason without the path it repeats; else the first line of the message."""
    lines = str(err).splitlines()
    return getattr(err, "strerror", None) or (lines[0] if lines else type(err).__name__)


def refuse_unknown_keys(values: dict, known, section: str) -> None:
    """A params.yaml section's keys must be ones its consumer knows: a misspelt one is named, not ignored."""
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"params.yaml [{section}]: unknown keys {sorted(unknown)}; known: {sorted(known)}")


class ServingError(RuntimeError):
    """The inference server cannot be started, reloaded or reached as asked."""
