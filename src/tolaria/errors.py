"""Errors a user can act on.  The CLI prints their message in one line, no traceback."""


class TolariaError(Exception):
    """Base class: the message names the cause and, where there is one, the culprit."""

    exit_code = 1


class ConfigError(TolariaError):
    """A configuration file, key, value or override is wrong."""

    exit_code = 2


class IllegalTransitionError(TolariaError):
    """A seed was asked to move along an edge the lifecycle does not have."""


class BlueprintError(TolariaError):
    """A blueprint is unknown, or does not fit the chunk it was grafted onto."""


class CheckpointError(TolariaError):
    """A checkpoint is missing, corrupt, tampered with, or does not fit the model."""


class OptimizerManifestError(TolariaError):
    """The optimizer does not hold exactly the model's trainable parameters."""


class RepeatedFailureError(TolariaError):
    """The same emergency recurred too often: rolling back again would loop forever."""


class RunDirectoryInUse(TolariaError):
    """Another process holds the run directory: it has one writer."""
