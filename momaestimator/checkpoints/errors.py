"""Exceptions raised while reading checkpoints."""

from __future__ import annotations

import pickle

__all__ = ["CheckpointError", "CorruptCheckpointError", "UnsafeCheckpointError"]


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be turned into the requested model.

    Raised for missing or unexpected keys, shape mismatches with the requested
    architecture, and files whose content is not what the loader expects.

    Examples
    --------
    >>> from momaestimator.checkpoints import CheckpointError, head_from_checkpoint
    >>> try:
    ...     head_from_checkpoint({"bias": 0})
    ... except CheckpointError as err:
    ...     print(type(err).__name__, isinstance(err, ValueError))
    CheckpointError True
    """


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is truncated, corrupt, or not a checkpoint at all.

    The message names the file and suggests downloading it again: in practice
    these are interrupted downloads, HTML error pages saved under a ``.pt``
    name, or Git LFS pointer files.

    Examples
    --------
    >>> import os, tempfile
    >>> from momaestimator.checkpoints import CorruptCheckpointError, read_checkpoint
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "finetuned.pt")
    ...     with open(path, "wb") as f:
    ...         _ = f.write(b"<html>404 Not Found</html>")
    ...     try:
    ...         read_checkpoint(path)
    ...     except CorruptCheckpointError as err:
    ...         print("corrupt:", "HTML" in str(err))
    corrupt: True
    """


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A pickle refers to a global that the restricted unpickler refuses.

    Unpickling a global means importing it and, for callables, calling it:
    that is how a crafted pickle runs code. The restricted unpickler only
    knows the classes of the published releases and torch's tensor rebuild
    helpers; every other global raises this error, which names it.

    Examples
    --------
    >>> import os, pickle, tempfile
    >>> from momaestimator.checkpoints import UnsafeCheckpointError, load_legacy_pickle
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "evil.pkl")
    ...     with open(path, "wb") as f:
    ...         pickle.dump(os.system, f)  # a reference to a callable: what a crafted pickle would call
    ...     try:
    ...         load_legacy_pickle(path)
    ...     except UnsafeCheckpointError as err:
    ...         print("refused:", "posix.system" in str(err))
    refused: True
    """
