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


class ExportError(TolariaError):
    """A model cannot be exported, or what would be written does not reproduce it."""


class OptimizerManifestError(TolariaError):
    """The optimizer does not hold exactly the model's trainable parameters."""


class RepeatedFailureError(TolariaError):
    """The same emergency recurred too often: rolling back again would loop forever."""

    def __init__(self, message: str, kind: str = "") -> None:
        super().__init__(message)
        #: The emergency's kind (``divergence``, ``nonfinite_loss``, ``collapse``).
        self.kind = kind


class RunDirectoryInUse(TolariaError):
    """Another process holds the run directory: it has one writer."""


class RunMismatch(ConfigError):
    """A checkpoint belongs to a run with other data, model, optimizer or seed."""


class RunWriteError(TolariaError):
    """A file of the run could not be written: a full disk, a read-only or vanished folder."""


class ReplayError(TolariaError):
    """The academy's replay buffer cannot be opened or written: a file that is not ours, a
    newer schema, a full disk, a lock held past the timeout."""

    exit_code = 2


class ReplaySchemaError(ReplayError):
    """The replay buffer's file is of a newer schema, or not a replay buffer at all: this
    Tolaria must not write it."""


class PolicyVersionError(TolariaError):
    """A policy version of the academy is missing, corrupt, or cannot be made champion."""

    exit_code = 2


class NoCheckpoint(CheckpointError):
    """The run has no checkpoint of the kind asked for: a usage error, like a wrong path."""

    exit_code = 2


class CallbackError(TolariaError):
    """A callback raised: the message names it, the event and the exception (``--debug``
    shows its traceback); the run ends ``failed`` with what it had written kept."""


class DistributedError(TolariaError):
    """The ranks of a multi-process run disagree (structure, config), or one of them stopped
    or did not answer in time: the message names the ranks."""


class SandboxError(TolariaError):
    """A job in the training sandbox crashed, ran past its wall-clock budget or its memory
    cap: the message is the cause in one line; nothing outside its scratch changed."""


class NightlyInUse(TolariaError):
    """Another nightly session holds the academy: one at a time."""

    exit_code = 2
