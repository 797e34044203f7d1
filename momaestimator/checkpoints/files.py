"""Reading checkpoint files safely, and writing files atomically."""

from __future__ import annotations

import io
import pickle
import pickletools
import tarfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from momaestimator._io import atomic_write
from momaestimator.checkpoints.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from momaestimator.checkpoints.safe_pickle import (
    RestrictedUnpickler,
    check_tensor_extent,
    refuse_compressed_entries,
    torch_load_restricted,
    torchscript_entries,
)

__all__ = ["atomic_write", "load_legacy_pickle", "load_state_dict_file", "read_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"
_REDOWNLOAD = "download it again (an interrupted download or a disk error leaves such files)"


def _corrupt(path: Path, what: str, cause: BaseException | None = None) -> CorruptCheckpointError:
    size = path.stat().st_size if path.exists() else 0
    detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
    return CorruptCheckpointError(f"{path} ({size} bytes) {what}{detail}; {_REDOWNLOAD}.")


# Opcodes a protocol 0 or 1 pickle (no PROTO header) starts with: MARK, EMPTY_DICT, EMPTY_LIST,
# EMPTY_TUPLE, GLOBAL, and the integers, strings and None a first object can be.
_OLD_PICKLE_STARTS = frozenset(b"(})]cLIJKMNSVXFGUT")


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    # An 8-byte little-endian header length that fits in the file, then the JSON header.
    if len(head) < 10 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= size - 8


def _looks_like_old_pickle(head: bytes) -> bool:
    """A protocol 0 or 1 pickle: no 0x80 header, so its first opcodes must parse."""
    if head[:1] == b"" or head[0] not in _OLD_PICKLE_STARTS:
        return False
    try:
        for count, _ in enumerate(pickletools.genops(io.BytesIO(head)), start=1):
            if count >= 4:
                return True
    except Exception:  # not a pickle, or the head ends inside an opcode
        return False
    return True  # the whole (tiny) file parsed


def _sniff(path: Path) -> str:
    """Tell the file format from its first bytes: 'zip', 'pickle', 'safetensors'.

    Raises :class:`UnsafeCheckpointError` for a TorchScript archive (which ``torch.load``
    would hand to ``torch.jit.load``, running its code) before anything is deserialized.
    """
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(1024)
    if not head:
        raise _corrupt(path, "is empty")
    if head.startswith(_ZIP_MAGIC):
        # The central directory sits at the end of a zip: a truncated file has none.
        if not zipfile.is_zipfile(path):
            raise _corrupt(path, "is a truncated or damaged zip archive (torch.save format)")
        entries = torchscript_entries(path)
        if entries:
            raise UnsafeCheckpointError(
                f"refused to load {path}: it is a TorchScript archive (it holds {entries[0]}), not a torch.save "
                "checkpoint; loading it would run the code it contains. If you trust this file, load it with "
                "torch.jit.load yourself and pass its state_dict() instead."
            )
        refuse_compressed_entries(path)
        return "zip"
    # Before the pickle test: a safetensors header length can start with any byte, 0x80 included.
    if _looks_like_safetensors(head, size):
        return "safetensors"
    if head.startswith(b"version https://git-lfs"):
        raise CorruptCheckpointError(
            f"{path} is a Git LFS pointer, not the checkpoint: fetch the file itself (git lfs pull) or {_REDOWNLOAD}."
        )
    if head.lstrip()[:1] == b"<":
        raise _corrupt(path, "looks like an HTML/XML page, not a checkpoint (a failed download?)")
    if head[:1] == b"\x80" or _looks_like_old_pickle(head):
        return "pickle"
    if head[8:9] == b"{":
        return "safetensors"  # a header longer than the file: the safetensors reader reports it
    raise _corrupt(path, "is not a torch.save archive, a pickle or a safetensors file")


def _unreadable(path: Path, err: BaseException) -> CheckpointError:
    """The error for a file that failed to load: damaged (truncated, flipped bytes) or malformed."""
    if isinstance(err, (MemoryError, RecursionError)):
        return CorruptCheckpointError(
            f"{path} could not be read ({type(err).__name__}): it asks for more memory or nesting than a "
            "checkpoint needs; a damaged or crafted file"
        )
    what = "could not be read" if _is_corruption(err) else "is damaged or not a checkpoint this library reads"
    return _corrupt(path, what, err)


def _is_corruption(err: BaseException) -> bool:
    if isinstance(err, (EOFError, zipfile.BadZipFile)):
        return True
    if isinstance(err, pickle.UnpicklingError) and not isinstance(err, UnsafeCheckpointError):
        return True
    text = str(err)
    return isinstance(err, (RuntimeError, ValueError, OSError)) and any(
        marker in text
        for marker in (
            "PytorchStreamReader",
            "Invalid magic number",
            "corrupt",
            "unexpected EOF",
            "failed finding central directory",
            "file read failed",
        )
    )


def load_state_dict_file(path) -> dict[str, torch.Tensor]:
    """Load a plain state dict from a ``.safetensors`` file or a ``torch.save`` file.

    ``torch.save`` files are read with ``weights_only=True``: only tensors and
    plain containers are accepted, never pickled objects.

    Parameters
    ----------
    path : str or os.PathLike
        The file.

    Returns
    -------
    dict of str to torch.Tensor
        The tensors, on the CPU.

    Raises
    ------
    CorruptCheckpointError
        If the file is truncated or corrupt; the message names it.
    CheckpointError
        If the file holds pickled objects rather than tensors (a whole-object release
        pickle: read those with :func:`load_legacy_pickle` or the release loaders), or
        is not a mapping of tensors.

    Examples
    --------
    >>> import tempfile, torch
    >>> from momaestimator.checkpoints import load_state_dict_file
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     torch.save({"w": torch.ones(2)}, f"{tmp}/w.pt")
    ...     load_state_dict_file(f"{tmp}/w.pt")
    {'w': tensor([1., 1.])}
    """
    path = Path(path).expanduser()
    kind = _sniff(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise _corrupt(path, "could not be read", err) from err
        names = _unsafe_globals(path)
        raise CheckpointError(
            f"{path} is not a plain state dict: it pickles objects ({', '.join(names) or 'see below'}). "
            "For the whole-object pickles of the task_vectors / TALL-masks releases use "
            "load_legacy_pickle() or the release loaders, which map the known classes safely."
        ) from err
    except Exception as err:
        raise _unreadable(path, err) from err
    return _as_tensor_dict(_checked_extents(obj, path), path)


def _unsafe_globals(path: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the names only decorate an error message
        return []


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except SafetensorError as err:
        raise _corrupt(path, "is not a readable safetensors file", err) from err


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


def _is_tensor_mapping(obj) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _as_tensor_dict(obj, path) -> dict[str, torch.Tensor]:
    # Some trainers wrap the weights: {"state_dict": {...}}, possibly next to {"epoch": ...}.
    if isinstance(obj, Mapping) and not _is_tensor_mapping(obj):
        wrapped = next((obj[k] for k in _WRAPPER_KEYS if k in obj and _is_tensor_mapping(obj[k])), None)
        if wrapped is not None:
            obj = wrapped
    if not _is_tensor_mapping(obj):
        raise CheckpointError(f"{path} does not hold a mapping of names to tensors (got {type(obj).__name__})")
    return dict(obj)


def load_legacy_pickle(path):
    """Load a whole-object pickle (``torch.save(module)`` or ``pickle.dump``) safely.

    The release classes (``src.modeling.ImageEncoder``, ``src.modeling.ClassificationHead``,
    ``src.models.modeling.*``, ``open_clip.model.VisualTransformer``, ...) and ``torch.nn``
    classes come back as inert :class:`~momaestimator.checkpoints.safe_pickle.LegacyObject`
    stand-ins; read their tensors with
    :func:`~momaestimator.checkpoints.safe_pickle.legacy_state_dict`. Any other global
    is refused.

    Parameters
    ----------
    path : str or os.PathLike
        A ``torch.save`` archive, a legacy (pre-1.6) ``torch.save`` file, or a plain pickle.

    Returns
    -------
    object
        The unpickled object; tensors are on the CPU.

    Raises
    ------
    UnsafeCheckpointError
        If the pickle refers to a global outside the known set; the message names it.
    CorruptCheckpointError
        If the file is truncated or corrupt.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from momaestimator.checkpoints import legacy_state_dict, load_legacy_pickle
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "linear.pt")
    ...     torch.save(torch.nn.Linear(2, 1), path)  # a whole pickled module
    ...     obj = load_legacy_pickle(path)           # an inert stand-in: no nn.Linear code runs
    >>> sorted(legacy_state_dict(obj))
    ['bias', 'weight']
    """
    path = Path(path).expanduser()
    kind = _sniff(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    try:
        if kind == "zip":
            return torch_load_restricted(path)
        with open(path, "rb") as f:
            first = RestrictedUnpickler(f, encoding="utf-8").load()
            more = bool(f.read(1))
        if type(first) is int and first != torch.serialization.MAGIC_NUMBER and more:
            # an integer followed by more pickles is the legacy format's header with a damaged magic
            # number (torch.load: "Invalid magic number; corrupt file?"), not a checkpoint
            raise _corrupt(path, "starts like a legacy torch.save file, but its magic number is wrong")
        # torch.save's pre-1.6 format starts with a pickled magic number, then the object;
        # anything else is a plain pickle.dump whose first object is the whole content.
        if isinstance(first, int) and first == torch.serialization.MAGIC_NUMBER:
            if tarfile.is_tarfile(path):
                # torch.load would extract it (pre-0.4 format) without an extraction filter
                raise UnsafeCheckpointError(
                    "refused: it is a tar archive (torch.save's pre-0.4 format), whose "
                    "extraction could open any file or block on a pipe; re-save it with a current torch"
                )
            return torch_load_restricted(path)
        return first
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(f"{path}: {err}") from None
    except CheckpointError:
        raise
    except RuntimeError as err:
        if "Can not safely load weights when explicit pickle_module" in str(err):
            raise CheckpointError(
                f"{path} is a whole-object pickle and TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which forbids "
                "even the restricted unpickler; unset it to load this release file"
            ) from err
        raise _unreadable(path, err) from err
    except Exception as err:  # damaged or crafted: the unpickler's own errors, whatever their type
        raise _unreadable(path, err) from err


def read_checkpoint(path):
    """Read any supported checkpoint file: state dict first, restricted pickle if needed.

    A safetensors file or a ``torch.save`` of tensors loads with ``weights_only=True``;
    a ``torch.save`` archive that pickles objects (the task_vectors release) goes through
    :func:`load_legacy_pickle`. Files in the legacy or plain-pickle formats always go through
    the restricted unpickler.

    Parameters
    ----------
    path : str or os.PathLike
        The checkpoint.

    Returns
    -------
    dict of str to torch.Tensor or LegacyObject or object
        A state dict, or the stand-in of a pickled module.

    Examples
    --------
    >>> import os, tempfile, torch
    >>> from momaestimator.checkpoints import read_checkpoint
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "state.pt")
    ...     torch.save(torch.nn.Linear(2, 1).state_dict(), path)
    ...     sorted(read_checkpoint(path))
    ['bias', 'weight']
    """
    path = Path(path).expanduser()
    kind = _sniff(path)
    if kind == "safetensors":
        return _load_safetensors(path)
    if kind == "zip" and not _unsafe_globals_or_unknown(path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # Only torch's own globals, used in a way its weights-only unpickler refuses: the
            # restricted unpickler tells what is wrong (or loads what is merely unusual).
            if "Weights only load failed" not in str(err):
                raise _corrupt(path, "could not be read", err) from err
        except Exception as err:
            raise _unreadable(path, err) from err
        else:
            return _checked_extents(obj, path)
    return load_legacy_pickle(path)


def _checked_extents(obj, path):
    """``obj`` (a loaded container), after refusing any tensor in it that views more than its storage."""
    stack, seen = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            try:
                check_tensor_extent(item)
            except UnsafeCheckpointError as err:
                raise UnsafeCheckpointError(f"{path}: {err}") from None
        elif isinstance(item, Mapping):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return obj


def _unsafe_globals_or_unknown(path: Path) -> bool:
    try:
        return bool(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:
        return True  # let the restricted unpickler decide and report
