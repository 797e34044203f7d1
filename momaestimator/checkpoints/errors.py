"""Exceptions raised while reading checkpoints."""

from __future__ import annotations

import pickle

__all__ = ["CheckpointError", "CorruptCheckpointError", "UnsafeCheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be turned into the requested model.

    Raised for missing or unexpected keys, shape mismatches with the requested
    architecture, and files whose content is not what the loader expects.
    """


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, corrupt, or not a checkpoint at all.

    The message names the file and suggests downloading it again: in practice
    these are interrupted downloads, HTML error pages saved under a ``.pt``
    name, or Git LFS pointer files.
    """


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A pickle refers to a global that the restricted unpickler refuses.

    Unpickling a global means importing it and, for callables, calling it:
    that is how a crafted pickle runs code. The restricted unpickler only
    knows the classes of the published releases and torch's tensor rebuild
    helpers; every other global raises this error, which names it.
    """
