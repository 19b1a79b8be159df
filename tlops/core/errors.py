"""Errors that name what is wrong; permanent ones are never retried."""


class TlopsError(Exception):
    """Base of every error tlops raises on purpose."""


class ConfigError(TlopsError):
    """params.yaml (or a CLI option) is invalid: fix the config, retrying cannot help."""


class DataError(TlopsError):
    """The dataset cannot be used as it is: fix the data, retrying cannot help."""


class NonFiniteLossError(TlopsError):
    """Training produced a NaN or inf loss."""


class ModelIntegrityError(TlopsError):
    """A model file does not match its recorded checksum or metadata."""


class ParityError(TlopsError):
    """The exported ONNX model disagrees with PyTorch beyond tolerance."""


class WorkspaceBusyError(TlopsError):
    """Another pipeline run holds this workspace (DVC cannot run twice in one workspace)."""


class TrialPruned(TlopsError):
    """A `tlops tune` trial stopped by the study's pruner: an outcome, not a fault; never retried."""


PERMANENT = (ConfigError, DataError, NonFiniteLossError, ModelIntegrityError, ParityError, TrialPruned)


def is_permanent(exc: BaseException) -> bool:
    """True for failures that a retry cannot fix."""
    return isinstance(exc, PERMANENT)
