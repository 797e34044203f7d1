"""A restricted unpickler for the whole-object pickles of the published releases.

The task_vectors release saved its encoders and heads with ``torch.save(module)``:
the file holds a pickle of ``src.modeling.ImageEncoder`` wrapping an
open_clip 2.0.2 ``CLIP``. Loading it the ordinary way needs those classes to be
importable (``No module named 'src.modeling'``, ``Can't get attribute
'VisualTransformer'``) and, worse, runs whatever the pickle asks for.

Here every class of a known namespace is replaced by an inert :class:`LegacyObject`
stand-in that only records its state, and only a short list of genuinely needed
callables (torch's tensor rebuild helpers, ``OrderedDict``, ``set``, ...) is resolved
to the real thing. Any other global raises :class:`UnsafeCheckpointError` naming it.
The pickle's ``BUILD`` opcode (``__setstate__`` / attribute update) is only carried out
on stand-ins and on the few types that need it (``OrderedDict``, tensors, numpy dtypes),
as in torch's own ``weights_only`` unpickler: on the shared objects ``find_class`` returns
it would change them for the whole process. TorchScript archives, which ``torch.load``
hands to ``torch.jit.load`` (running the archive's code), are refused.
The tensors are then read out of the stand-in tree with :func:`legacy_state_dict`.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import collections
import copyreg
import functools
import io
import os
import pickle
import struct
import sys
import types
import zipfile
from collections.abc import Iterator

import torch
from torch import nn

from momaestimator.checkpoints.errors import UnsafeCheckpointError

__all__ = ["LegacyObject", "check_tensor_extent", "legacy_class_name", "legacy_modules", "legacy_state_dict"]

# Modules whose classes become inert stand-ins. Nothing from them is imported or called,
# so any class name in them is as safe as any other; they are the code of the releases
# (src.modeling, src.models.modeling), open_clip of any version (2.0.2's
# open_clip.model.VisualTransformer no longer exists), and the torchvision transforms the
# release's ImageEncoder kept as attributes (train_preprocess / val_preprocess).
_STAND_IN_NAMESPACES = ("src.modeling", "src.models", "src.heads", "open_clip", "torchvision.transforms")


# The text encodings a pickle's ``_codecs.encode(text, encoding)`` may name: protocol 2 stores
# bytes as ``encode(text, "latin1")``. Other codecs (punycode's cost grows faster than the square of
# the text) are refused.
_PICKLE_CODECS = frozenset({"latin1", "latin-1", "latin_1", "iso-8859-1", "iso8859-1", "utf-8", "utf8", "ascii"})


def _encode(text, encoding="utf-8", errors="strict"):
    if not isinstance(encoding, str) or encoding.lower() not in _PICKLE_CODECS:
        raise UnsafeCheckpointError(
            f"refused to unpickle: _codecs.encode with the codec {encoding!r}; pickles store bytes as latin1 text"
        )
    return codecs.encode(text, encoding, errors)


def _bytearray(*args):
    # bytearray(n) allocates n zero bytes: a few bytes of pickle could ask for gigabytes.
    if args and not isinstance(args[0], (str, bytes, bytearray)):
        raise UnsafeCheckpointError(
            f"refused to unpickle: bytearray({type(args[0]).__name__}); pickles build a bytearray from its bytes"
        )
    return bytearray(*args)


def check_tensor_extent(tensor: torch.Tensor, what: str = "a tensor") -> torch.Tensor:
    """Refuse a tensor that views more elements than its storage holds (an expanded, stride-0 view).

    ``torch.save`` keeps a view's strides: a file of a few bytes can hold one float "expanded" to
    billions of entries, which the first copy (a head's weight, ``.contiguous()``) would
    materialise. Weight files never hold such views.

    Parameters
    ----------
    tensor : torch.Tensor
    what : str
        Its name, for the message.

    Returns
    -------
    torch.Tensor
        ``tensor`` itself.

    Raises
    ------
    UnsafeCheckpointError
        If ``tensor`` has more elements than fit in its storage.

    Examples
    --------
    >>> import torch
    >>> check_tensor_extent(torch.zeros(3)).shape
    torch.Size([3])
    >>> check_tensor_extent(torch.zeros(1).expand(1000))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    momaestimator.checkpoints.errors.UnsafeCheckpointError: refused: a tensor views 1000 elements of a storage of 1 ...
    """
    if tensor.layout != torch.strided or tensor.is_meta:  # sparse: no strides; meta: no memory
        return tensor
    size = tensor.element_size()
    held = tensor.untyped_storage().nbytes() // size if size else 0
    if tensor.numel() > max(held, 1):
        raise UnsafeCheckpointError(
            f"refused: {what} views {tensor.numel()} elements of a storage of {held} (an expanded, overlapping "
            f"view of shape {tuple(tensor.shape)}, strides {tensor.stride()}); weight files hold no such views, "
            "and copying it would take memory set by the file's numbers rather than its size"
        )
    return tensor


def _checked_rebuild(rebuild):
    @functools.wraps(rebuild)
    def checked(*args, **kwargs):
        return check_tensor_extent(rebuild(*args, **kwargs))

    return checked


def _allowed_callables() -> dict[tuple[str, str], object]:
    """The real callables a release pickle needs, each harmless whatever its arguments."""
    allowed = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): _bytearray,
        # Protocol 0/1 object reconstruction; ``cls`` and ``base`` come through find_class too.
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        # ``_reconstructor``'s usual ``base`` argument; ``object()`` is as inert as it gets.
        ("builtins", "object"): object,
        # Protocol 2 pickles store bytes as ``_codecs.encode(text, "latin1")``; torch's
        # weights_only unpickler allows it too.
        ("_codecs", "encode"): _encode,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
        ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
        if hasattr(torch._utils, name):
            allowed["torch._utils", name] = _checked_rebuild(getattr(torch._utils, name))
    for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):  # of a tensor rebuilt above
        if hasattr(torch._utils, name):
            allowed["torch._utils", name] = getattr(torch._utils, name)
    return allowed


class LegacyObject:
    r"""Inert stand-in for an object of a class known from the releases.

    Unpickling creates one subclass per original class (its name is in
    :attr:`legacy_class`) and fills the instance ``__dict__`` with the pickled
    state; no code of the original class runs. For a pickled ``nn.Module`` the
    state holds ``_parameters``, ``_buffers`` and ``_modules``, which
    :func:`legacy_state_dict` walks.

    Parameters
    ----------
    *args, **kwargs
        Ignored: the pickled state is set by ``__setstate__``, never by a constructor.

    Examples
    --------
    A pickle of a ``src.modeling.ClassificationHead`` with ``normalize=True``, loaded
    without ``src.modeling`` being importable:

    >>> from momaestimator.checkpoints.safe_pickle import legacy_class_name, loads_restricted
    >>> data = b"csrc.modeling\nClassificationHead\n)\x81}(Vnormalize\nI01\nub."
    >>> head = loads_restricted(data)
    >>> legacy_class_name(head), head.normalize
    ('src.modeling.ClassificationHead', True)
    """

    legacy_class = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        # Reached only when a pickle calls the class (e.g. an Enum member by value):
        # keep the arguments for inspection, run nothing.
        self.__dict__["_legacy_args"] = args

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
            if isinstance(slots, dict):
                state = {**(state or {}), **slots}
        if isinstance(state, dict):
            # Dunder keys would shadow the stand-in's own protocol methods on a later BUILD.
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str) and not k.startswith("__")})
        else:
            self.__dict__["_legacy_state"] = state

    def __repr__(self) -> str:
        return f"<LegacyObject {type(self).legacy_class}>"


_STAND_IN_CLASSES: dict[str, type] = {}


def _stand_in(module: str, name: str) -> type:
    qualified = f"{module}.{name}"
    cls = _STAND_IN_CLASSES.get(qualified)
    if cls is None:
        cls = type(name, (LegacyObject,), {"legacy_class": qualified, "__module__": __name__})
        _STAND_IN_CLASSES[qualified] = cls
    return cls


def _is_identifier_path(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _in_namespace(module: str, namespace: str) -> bool:
    return module == namespace or module.startswith(namespace + ".")


def _is_torch_nn_class(module: str, name: str) -> bool:
    # Only classes that this torch already defines; nothing is imported to check.
    if not _in_namespace(module, "torch.nn.modules") and module != "torch.nn":
        return False
    obj = getattr(sys.modules.get(module), name, None)
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def _numpy_dtype_type():
    numpy = sys.modules.get("numpy")  # only loaded when find_class let a numpy dtype through
    return numpy.dtype if numpy is not None else ()


def _update_instance_dict(inst, state, what: str) -> None:
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    for part in (state, slots):
        if part is None:
            continue
        if not isinstance(part, dict) or not all(isinstance(k, str) for k in part):
            raise UnsafeCheckpointError(f"refused to unpickle: malformed state for {what}")
        inst.__dict__.update(part)


class _OpcodeTable(dict):
    """The pure-Python unpickler's opcode table, reporting unknown opcodes as the C one does."""

    def __missing__(self, key):
        raise pickle.UnpicklingError(f"invalid load key, {chr(key)!r}.")


def _describe(obj) -> str:
    if isinstance(obj, type) and issubclass(obj, LegacyObject):
        return f"the class {obj.legacy_class}"
    if isinstance(obj, type) or callable(obj):
        name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__name__
        return f"{'the class ' if isinstance(obj, type) else ''}{getattr(obj, '__module__', None) or '?'}.{name}"
    return f"a {type(obj).__module__}.{type(obj).__qualname__} object"


class RestrictedUnpickler(pickle._Unpickler):
    """Unpickler that resolves only known, harmless globals and restricts ``BUILD``.

    Classes of the releases' namespaces and of ``torch.nn`` become
    :class:`LegacyObject` stand-ins; torch dtypes and a short list of callables
    resolve to the real objects; everything else raises
    :class:`~momaestimator.checkpoints.errors.UnsafeCheckpointError`.

    The ``BUILD`` opcode (restore an object's state: ``__setstate__``, or an update of its
    ``__dict__`` and attributes) is carried out only on stand-in instances, ``OrderedDict``,
    ``torch.Tensor``, ``torch.nn.Parameter`` and numpy dtypes, the types torch's own
    ``weights_only`` unpickler builds. On anything else, in particular on the functions and
    classes ``find_class`` returns, which are shared by the whole process (setting
    ``torch._utils._rebuild_tensor_v2.__defaults__`` would alter every tensor loaded
    afterwards), it raises :class:`~momaestimator.checkpoints.errors.UnsafeCheckpointError`.

    This is the pure-Python unpickler of the standard library, whose opcode table can be
    restricted; the pickles it reads (the object tree of a ``torch.save`` file, whose tensor
    data is stored apart) are small.
    """

    _allowed = None

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        kind = type(inst)
        if isinstance(inst, LegacyObject):
            # The stand-in's own method, never one looked up on the instance.
            LegacyObject.__setstate__(inst, state)
        elif kind is collections.OrderedDict:
            # state_dict()'s ``_metadata`` attribute.
            _update_instance_dict(inst, state, "an OrderedDict")
        elif kind is torch.Tensor:
            # Tensors of the pre-0.4 format: (storage, offset, size, stride).
            inst.set_(*state)
            check_tensor_extent(inst)  # the new strides, as a rebuild's are checked
        elif kind is nn.Parameter:
            inst.__setstate__(state)
            check_tensor_extent(inst)
        elif isinstance(inst, _numpy_dtype_type()):
            # The byte order and flags of a dtype built for a numpy scalar; a new instance.
            inst.__setstate__(state)
        else:
            raise UnsafeCheckpointError(
                f"refused to unpickle: the pickle sets the state of {_describe(inst)} (BUILD), which only "
                "stand-ins of the release classes, OrderedDict, tensors and numpy dtypes may receive; on a "
                "function or class it would change it for the whole process. No torch.save writes this."
            )

    def load(self):
        try:
            return super().load()
        except (struct.error, IndexError) as err:
            # Where the C unpickler says "pickle data was truncated" or "stack underflow".
            raise pickle.UnpicklingError(f"corrupt pickle data ({type(err).__name__}: {err})") from err

    def _at_end(self) -> bool:
        """Whether the pickle's data ends here (nothing after the opcode just read)."""
        try:
            frame = self._unframer.current_frame
            if frame is not None:
                position = frame.tell()
                more = frame.read(1)
                frame.seek(position)
                if more:
                    return False
            return not self._file_read(1)  # only called when the load is about to fail anyway
        except Exception:
            return False

    dispatch = _OpcodeTable(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module, name):
        module, name = str(module), str(name)
        # Python 2 names (``__builtin__.set`` in protocol-2 pickles), mapped as pickle's own
        # find_class does; overriding find_class skips that mapping.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualified = f"{module}.{name}"
        allowed = type(self)._allowed
        if allowed is None:
            allowed = type(self)._allowed = _allowed_callables()
        if (module, name) in allowed:
            return allowed[module, name]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in ("numpy", "numpy.core.multiarray", "numpy._core.multiarray") and name in (
            "dtype",
            "scalar",
        ):
            # numpy scalars (a float attribute computed with numpy) pickle through these two,
            # which only build a dtype or a scalar from bytes.
            import numpy

            multiarray = getattr(numpy, "_core", None) or numpy.core
            return numpy.dtype if name == "dtype" else multiarray.multiarray.scalar
        if _is_identifier_path(module) and name.isidentifier():
            if any(_in_namespace(module, ns) for ns in _STAND_IN_NAMESPACES) or _is_torch_nn_class(module, name):
                return _stand_in(module, name)
        if self._at_end():
            # A file cut inside a GLOBAL opcode reads as a clipped name ('_rebuild_tensor_'): a
            # truncated download, not an attack.
            raise pickle.UnpicklingError(f"pickle data was truncated (it ends at the global {qualified!r})")
        raise UnsafeCheckpointError(
            f"refused to unpickle global {qualified!r}: it is not one of the classes of the task_vectors / "
            "TALL-masks releases, open_clip or torch.nn, nor a tensor rebuild helper. Loading it could run "
            "arbitrary code. If you trust this file, load it yourself and pass its state dict instead."
        )


def _restricted_load(file, **kwargs):
    return RestrictedUnpickler(file, **kwargs).load()


def _restricted_loads(data, **kwargs):
    return RestrictedUnpickler(io.BytesIO(data), **kwargs).load()


# torch.load(pickle_module=...) uses .Unpickler for the main pickle and .load for the small
# records of its legacy format; both must be restricted.
RESTRICTED_PICKLE_MODULE = types.ModuleType("momaestimator_restricted_pickle")
RESTRICTED_PICKLE_MODULE.Unpickler = RestrictedUnpickler
RESTRICTED_PICKLE_MODULE.load = _restricted_load
RESTRICTED_PICKLE_MODULE.loads = _restricted_loads
RESTRICTED_PICKLE_MODULE.UnpicklingError = pickle.UnpicklingError


def _is_torchscript_entry(name: str) -> bool:
    return f"/{name}".endswith("/constants.pkl") or name.startswith("code/") or "/code/" in name


def torchscript_entries(file) -> list[str]:
    """The entries of a zip archive that make it a TorchScript archive (``*/constants.pkl``, ``*/code/``).

    Parameters
    ----------
    file : str, os.PathLike or binary file object
        The file; a file object is read from and returned to its current position.

    Returns
    -------
    list of str
        Empty for a ``torch.save`` archive of weights, or a file that is not a zip archive.

    Raises
    ------
    zipfile.BadZipFile
        If the file starts like a zip archive (as ``torch.load`` tells one) but is damaged.
    """
    position = file.tell() if hasattr(file, "tell") else None
    try:
        if position is None:
            with open(file, "rb") as f:
                magic = f.read(4)
        else:
            magic = file.read(4)
            file.seek(position)
        if magic != b"PK\x03\x04":
            return []  # torch.load reads it as a legacy pickle, never with torch.jit.load
        with zipfile.ZipFile(file) as archive:
            names = archive.namelist()
        entries = [name for name in names if _is_torchscript_entry(name)]
        if not entries:
            # torch.load's own test, on its own zip reader's view of the archive (they could differ
            # on a crafted file); if that reader fails, so does torch.load.
            if position is not None:
                file.seek(position)
            try:
                records = torch._C.PyTorchFileReader(file).get_all_records()
            except Exception:
                records = []
            entries = [name for name in records if _is_torchscript_entry(name)]
        return entries
    finally:
        if position is not None:
            file.seek(position)


def refuse_compressed_entries(file) -> None:
    """Refuse a zip archive with a compressed entry (torch.save stores every entry as it is).

    A compressed entry can inflate to any size: a file of a few MB could fill the memory.

    Parameters
    ----------
    file : str, os.PathLike or binary file object
        The file; a file object is returned to its current position. Not a zip: nothing to do.

    Raises
    ------
    UnsafeCheckpointError
        If an entry is compressed.
    """
    position = file.tell() if hasattr(file, "tell") else None
    try:
        if not zipfile.is_zipfile(file):
            return
        if position is not None:
            file.seek(position)
        with zipfile.ZipFile(file) as archive:
            packed = [i.filename for i in archive.infolist() if i.compress_type != zipfile.ZIP_STORED]
    finally:
        if position is not None:
            file.seek(position)
    if packed:
        name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else "the archive"
        raise UnsafeCheckpointError(
            f"refused to load {name}: its entry {packed[0]!r} is compressed, which torch.save never writes; "
            "a compressed entry can inflate to any size (a zip bomb)"
        )


def torch_load_restricted(file):
    """``torch.load`` of a torch.save file through :class:`RestrictedUnpickler`, onto the CPU.

    Raises
    ------
    UnsafeCheckpointError
        If ``file`` is a TorchScript archive: ``torch.load`` would hand it to ``torch.jit.load``,
        which runs the archive's code and never uses the restricted unpickler.
    """
    entries = torchscript_entries(file)
    if entries:
        name = os.fspath(file) if isinstance(file, (str, os.PathLike)) else "the archive"
        raise UnsafeCheckpointError(
            f"refused to load {name}: it is a TorchScript archive (it holds {entries[0]}), whose loading runs "
            "the code it contains. Checkpoints are torch.save files, pickles or safetensors files; if you trust "
            "this file, load it with torch.jit.load yourself and pass its state_dict() instead."
        )
    refuse_compressed_entries(file)
    # weights_only=False only lifts torch's own allowlist, which cannot map the release's class
    # names; every global still goes through RestrictedUnpickler.find_class.
    return torch.load(file, map_location="cpu", pickle_module=RESTRICTED_PICKLE_MODULE, weights_only=False)


def _load_storage_from_bytes(data):
    # A tensor pickled with plain pickle.dump stores its storage as torch.save bytes, which
    # torch.storage._load_from_bytes would read with an unrestricted torch.load.
    return torch_load_restricted(io.BytesIO(data))


def loads_restricted(data: bytes):
    """Unpickle bytes with :class:`RestrictedUnpickler` (no persistent ids).

    Parameters
    ----------
    data : bytes
        A pickle.

    Returns
    -------
    object
        The unpickled object, with release classes replaced by :class:`LegacyObject` stand-ins.

    Examples
    --------
    >>> import os, pickle
    >>> loads_restricted(pickle.dumps({"a": {1, 2}}))
    {'a': {1, 2}}
    >>> loads_restricted(pickle.dumps(os.system))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    momaestimator.checkpoints.errors.UnsafeCheckpointError: refused to unpickle global 'posix.system': ...
    """
    return _restricted_loads(data)


def legacy_class_name(obj) -> str | None:
    """The original ``module.Class`` of a stand-in, or ``None`` for any other object."""
    return type(obj).legacy_class if isinstance(obj, LegacyObject) else None


def legacy_modules(obj, prefix: str = "") -> Iterator[tuple[str, LegacyObject]]:
    """Yield ``(qualified_name, stand_in)`` for a pickled module and all its submodules.

    Parameters
    ----------
    obj : LegacyObject
        The stand-in of a pickled ``nn.Module``.
    prefix : str, default=""
        Prefix of the names, as in ``nn.Module.named_modules``.
    """
    stack = [(prefix.rstrip("."), obj)]
    seen = set()
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        children = module.__dict__.get("_modules") or {}
        for child_name, child in reversed(list(children.items())):
            if isinstance(child, LegacyObject):
                stack.append((f"{name}.{child_name}" if name else str(child_name), child))


def legacy_state_dict(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """The state dict a pickled ``nn.Module`` would have returned.

    Parameters
    ----------
    obj : LegacyObject
        Stand-in of a pickled ``nn.Module``.
    prefix : str, default=""
        Prepended to every key.

    Returns
    -------
    dict of str to torch.Tensor
        Parameters and persistent buffers, keyed like ``nn.Module.state_dict``.

    Raises
    ------
    TypeError
        If ``obj`` is not the stand-in of a module, or holds non-tensor parameters.

    Examples
    --------
    >>> import io, torch
    >>> from momaestimator.checkpoints import legacy_state_dict
    >>> from momaestimator.checkpoints.safe_pickle import torch_load_restricted
    >>> buffer = io.BytesIO()
    >>> torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), buffer)
    >>> _ = buffer.seek(0)
    >>> sorted(legacy_state_dict(torch_load_restricted(buffer)))
    ['0.bias', '0.weight']
    """
    if not isinstance(obj, LegacyObject) or "_parameters" not in obj.__dict__:
        raise TypeError(f"expected a pickled torch.nn.Module, got {obj!r}")
    out: dict[str, torch.Tensor] = {}
    _collect_state(obj, prefix, out, active=set())
    return out


_MAX_MODULE_DEPTH = 200  # a ViT-L/14 tower nests 6 deep; a crafted file could nest thousands


def _collect_state(module, prefix, out, active):
    if id(module) in active:
        raise TypeError(f"cyclic module structure at {prefix!r}")
    if len(active) >= _MAX_MODULE_DEPTH:
        raise TypeError(f"module tree nested more than {_MAX_MODULE_DEPTH} levels deep (at {prefix[:80]!r}...)")
    active.add(id(module))
    state = module.__dict__
    non_persistent = state.get("_non_persistent_buffers_set") or set()
    tensors = list((state.get("_parameters") or {}).items())
    tensors += [(k, v) for k, v in (state.get("_buffers") or {}).items() if k not in non_persistent]
    for key, value in tensors:
        if value is None:
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{prefix}{key} is a {type(value).__name__}, not a tensor")
        out[f"{prefix}{key}"] = value.detach() if isinstance(value, nn.Parameter) else value
    for key, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, LegacyObject):
            raise TypeError(f"submodule {prefix}{key} is a {type(child).__name__}, not a pickled module")
        _collect_state(child, f"{prefix}{key}.", out, active)
    active.discard(id(module))
