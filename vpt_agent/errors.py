"""One error family for everything vpt-agent raises or records."""
from __future__ import annotations


class VPTError(Exception):
    """Base class of every error vpt-agent raises on purpose."""


class BadImageError(VPTError, ValueError):
    """The input image cannot be read, is of an unsupported type or exceeds a limit."""


class BadQuestionError(VPTError, ValueError):
    """The question is empty, not a string or too long."""


class BadModelOutputError(VPTError):
    """The model generated a malformed VPT sequence (e.g. a region without x or y cells)."""


class MissingBranchError(VPTError):
    """An action asks for a re-encoding branch that the model does not have or that is disabled."""


class ConfigError(VPTError, ValueError):
    """A config lacks VPT fields, names an unknown branch, or is for another architecture."""


class CheckpointError(VPTError):
    """A checkpoint is missing, unsafe, or its weights do not fit the model."""


class InputMismatchError(VPTError, ValueError):
    """Model inputs disagree with each other (e.g. placeholder count vs. features given)."""


class ModelError(VPTError, RuntimeError):
    """Running the model or a perception tool failed (e.g. out of memory); the original exception
    is its ``__cause__``, and a checkpointed run can be retried from its last checkpoint."""


class PerceptionLimitError(VPTError):
    """The model asked for perception the run does not allow (step bound reached or action disabled)."""
