"""Errors a user can act on: which file, what is wrong, what to do."""
from typing import Optional


class UckptError(Exception):
    """Base class. ``str()`` is a one-line message naming the file (if any), the problem and the fix."""

    def __init__(self, problem: str, path: Optional[str] = None, fix: Optional[str] = None):
        self.problem, self.path, self.fix = problem, path, fix
        msg = f"{path}: {problem}" if path else problem
        if fix:
            msg += f" -- {fix}"
        super().__init__(msg)


class CheckpointError(UckptError):
    """The input is not a checkpoint uckpt can convert (missing, truncated or inconsistent files)."""


class InvalidCheckpointError(CheckpointError, ValueError):
    """The checkpoint cannot be loaded as asked: it does not fit the target (a shape, an expert count, a
    TP split) or no tag names it. DeepSpeed's loader raises ``ValueError`` for these, so code that
    catches ``ValueError`` around ``engine.load_checkpoint`` keeps working with uckpt's loader."""


class UnsupportedEngineError(UckptError, NotImplementedError):
    """An engine uckpt's loader does not restore (NVMe optimizer offload, no ZeRO / BF16 optimizer):
    :func:`uckpt.use_for_universal_loads` hands such loads back to DeepSpeed's own loader."""


class UnsupportedCheckpointError(UckptError, NotImplementedError):
    """A real checkpoint layout that uckpt does not convert yet."""


class OutputError(UckptError):
    """The output location cannot be used (exists, inside the input, not writable)."""


class RemoteError(UckptError):
    """Another converter rank failed; carries that rank's message so every rank reports the same cause."""


class AutoEPMetadataError(UckptError, RuntimeError):
    """AutoEP metadata is missing or inconsistent (DeepSpeed raises RuntimeError for these)."""


class MissingExpertFileError(UckptError, FileNotFoundError):
    """A per-expert model file named by the AutoEP metadata is not in the folder."""
