"""The one validation layer: every public entry point calls these before doing any work.

Messages name the offending task, parameter or file and say what was expected. Nothing here
modifies its inputs.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .data import index_input_hint, task_keyed
from .merging.functional import encode, first_linear_weight, plain_head, rotation_mismatch

BASES = ("task_arithmetic", "ties")
OBJECTIVE_NAMES = ("kl", "feature", "entropy")
PRECISIONS = {None: None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def inputs_blamed(what: str):
    """Turn a ``RuntimeError`` of a model run on some inputs into a ``ValueError`` saying ``what``.

    An out-of-memory error is not the inputs' fault and propagates as it is.
    """
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        raise ValueError(f"{what} ({exc})") from exc


def check_number(value, name, *, low=None, high=None, low_open=False, high_open=False, integer=False):
    """Raise ``TypeError``/``ValueError`` unless ``value`` is a finite number in the given range."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lb = "(" if low_open else "["
        hb = ")" if high_open else "]"
        rng = f"{lb}{'-inf' if low is None else low}, {'inf' if high is None else high}{hb}"
        raise ValueError(f"{name} must be in {rng}, got {value!r}")
    return value


def check_random_state(value, name="random_state"):
    """Raise ``ValueError`` unless ``value`` seeds scikit-learn's ``check_random_state`` (None, an int
    in ``[0, 2**32)``, a ``RandomState``); draws nothing from it.
    """
    from sklearn.utils import check_random_state as seeded

    try:
        seeded(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be None, an int in [0, 2**32) or a numpy RandomState, got {value!r}") from exc


def check_choice(value, name, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
    return value


def check_task_batching(value):
    """``"joint"``, ``"sequential"`` or a positive int (tasks per pass)."""
    if isinstance(value, str):
        if value not in ("joint", "sequential"):
            raise ValueError(
                f"unknown task_batching {value!r}; expected 'joint', 'sequential' or a positive int (tasks per pass)"
            )
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"task_batching must be 'joint', 'sequential' or a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"task_batching must be a positive number of tasks per pass, got {value}")
    return value


def resolve_device(device) -> torch.device:
    """A ``torch.device`` that exists on this machine, or a clear error."""
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str):
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise ValueError(f"unknown device {device!r}; expected 'cpu', 'cuda' or 'cuda:N'") from exc
    else:
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda', got {type(device).__name__}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {device!r} was requested but MPS is not available on this machine")
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; expected 'cpu', 'cuda' or 'mps'")
    return dev


def is_loader(value) -> bool:
    """A zero-argument callable that is not a module (modules are callable too)."""
    return callable(value) and not isinstance(value, (nn.Module, type))


def check_task_dict(value, name, *, allow_lazy=False) -> dict:
    """``{task: module}`` from a dict or list (or ``nn.ModuleDict``/``nn.ModuleList``), rejecting strings
    and single modules.
    """
    if isinstance(value, nn.ModuleDict):
        value = dict(value.items())
    elif isinstance(value, nn.ModuleList):
        value = list(value)
    if isinstance(value, nn.Module):
        raise TypeError(
            f"{name} must be a dict {{task: module}} or a list of modules, got a single {type(value).__name__}"
        )
    if value is None:
        raise TypeError(f"{name} is required (got None)")
    if isinstance(value, Mapping):
        out = task_keyed(value, name)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        out = {str(i): v for i, v in enumerate(value)}
    else:
        raise TypeError(f"{name} must be a dict {{task: module}} or a list of modules, got {type(value).__name__}")
    if not out:
        raise ValueError(f"{name} is empty: give at least one task")
    for task, m in out.items():
        if isinstance(m, nn.Module):
            continue
        if allow_lazy and isinstance(m, Mapping):
            continue
        if allow_lazy and isinstance(m, (str, os.PathLike)):
            if not os.path.isfile(os.path.expanduser(m)):
                raise ValueError(f"{name}[{task!r}] is the path {str(m)!r}, which is not an existing file")
            continue
        if allow_lazy and is_loader(m):
            continue
        what = (
            "a torch.nn.Module, a state dict, a checkpoint path or a loader (zero-argument callable)"
            if allow_lazy
            else "a torch.nn.Module"
        )
        hint = ""
        if not allow_lazy and (isinstance(m, (Mapping, str, os.PathLike)) or is_loader(m)):
            if name == "heads":
                hint = (
                    "; heads are read as modules: load a head file first, e.g. with "
                    "momaestimator.checkpoints.head_from_checkpoint(momaestimator.checkpoints.read_checkpoint(path))"
                )
            else:
                hint = (
                    "; only MOMAMerger's finetuned_encoders take state dicts, checkpoint paths and loaders: "
                    "load the models first, e.g. with momaestimator.checkpoints.load_open_clip_encoder"
                )
        raise TypeError(f"{name}[{task!r}] must be {what}, got {type(m).__name__}{hint}")
    return out


def check_heads_dict(value) -> dict:
    """``{task: head}`` (:func:`check_task_dict`), with parametrized heads as plain copies.

    A head whose weights are computed by a parametrization (``torch.nn.utils.parametrizations
    .weight_norm``, the older ``weight_norm``/``spectral_norm`` hooks) holds no ``weight`` entry
    to rotate: it is replaced by a copy holding its effective weights as plain parameters (the same
    function; the user's head is not modified).
    """
    return {t: plain_head(h) for t, h in check_task_dict(value, "heads").items()}


def encoder_dtype(module: nn.Module, state: dict | None = None):
    """The encoder's floating dtype: its first floating parameter's (a float64 constant buffer of a
    float32 encoder does not count), else its first floating state entry's; ``None`` without any.
    """
    if isinstance(module, nn.Module):
        param = next((p for p in module.parameters() if p.is_floating_point()), None)
        if param is not None:
            return param.dtype
    return next((v.dtype for v in (state or {}).values() if v.is_floating_point()), None)


def check_same_tasks(**named) -> list[str]:
    """All task collections name the same tasks; returns the reference order (the first one's)."""
    (ref_name, ref), *others = named.items()
    for other_name, other in others:
        missing = [t for t in ref if t not in other]
        extra = [t for t in other if t not in ref]
        if missing or extra:
            raise ValueError(
                f"{other_name} must name the same tasks as {ref_name} {list(ref)}; missing: {missing}, extra: {extra}"
            )
    return list(ref)


def check_state(state: dict, name: str) -> None:
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"{name}: entry {k!r} contains NaN or infinite values")


def check_encoder_states(
    pre_state: dict, ft_state: dict, task: str, *, values: bool = True, same_dtype: bool = False
) -> None:
    """Same entries, shapes and kinds as the pretrained encoder (dtypes too, with ``same_dtype``).

    Names the first difference.
    """
    for k, v in pre_state.items():
        if k not in ft_state:
            raise ValueError(f"finetuned_encoders[{task!r}] differs in architecture: missing entry {k!r}")
        w = ft_state[k]
        if w.shape != v.shape:
            raise ValueError(
                f"finetuned_encoders[{task!r}] differs in architecture: entry {k!r} has shape "
                f"{tuple(w.shape)}, the pretrained encoder has {tuple(v.shape)}"
            )
        if w.is_floating_point() != v.is_floating_point() or (same_dtype and w.dtype != v.dtype):
            raise ValueError(f"finetuned_encoders[{task!r}]: entry {k!r} is {w.dtype}, pretrained is {v.dtype}")
    extra = [k for k in ft_state if k not in pre_state]
    if extra:
        raise ValueError(f"finetuned_encoders[{task!r}] differs in architecture: unexpected entries {extra[:5]}")
    if values:
        check_state(ft_state, f"finetuned_encoders[{task!r}]")


def check_heads(heads: dict, feature_dim: int, dtype=None, *, rotations: bool = True) -> None:
    """Every head takes the encoder's features in its dtype, holds finite values, and absorbs a rotation.

    Parameters
    ----------
    heads : dict of str to torch.nn.Module
    feature_dim : int or None
        The encoder's number of output features (``None``: not checked).
    dtype : torch.dtype, optional
        The encoder's floating dtype; the heads' weights must share it.
    rotations : bool, default=True
        Check that rotating the features equals rotating the first linear weight
        (:func:`~momaestimator.merging.rotation_mismatch`), which absorption relies on.
    """
    for task, head in heads.items():
        wname = first_linear_weight(head, name=f"heads[{task!r}]")
        w = head.state_dict(keep_vars=True)[wname]
        if not w.is_floating_point():
            raise ValueError(f"heads[{task!r}]: weight must be floating point, got {w.dtype}")
        if feature_dim is not None and w.shape[1] != feature_dim:
            raise ValueError(
                f"heads[{task!r}] expects {w.shape[1]} input features but the encoder outputs {feature_dim}"
            )
        if dtype is not None and w.dtype != dtype:
            raise ValueError(
                f"heads[{task!r}] has {w.dtype} weights, the encoder {dtype}: put the encoder and the heads in "
                f"one dtype (e.g. head.to({dtype}))"
            )
        check_state({k: v.detach() for k, v in head.state_dict(keep_vars=True).items()}, f"heads[{task!r}]")
        if rotations:
            gap = rotation_mismatch(head)
            if gap > 1e-3:
                raise ValueError(
                    f"heads[{task!r}] ({type(head).__name__}) cannot absorb a rotation: on rotated features it "
                    f"gives other logits than with its weight {wname!r} rotated (relative gap {gap:.2g}). MOMA "
                    "folds each task's rotation into the weight of the head's first linear map, which is exact "
                    "only when the head applies that map to its input (after an optional L2 normalisation); "
                    "this head transforms its input first. Use nn.Linear, LinearHead, or an nn.Sequential "
                    "starting with a linear layer, or set learn_rotations=False"
                )


def check_precision(precision, state: dict) -> None:
    """Refuse an autocast ``precision`` that cannot apply to the encoder's weights, before any work.

    Autocast computes float32 operations in the lower precision: an encoder in float32 (or
    already holding weights in that dtype, as open_clip's ``precision="bf16"`` models do) can use
    it; a float64 encoder would silently run in float64, and one holding the *other* half dtype
    cannot run at all.
    """
    target = PRECISIONS.get(precision)
    if target is None:
        return
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    other = sorted(str(d).removeprefix("torch.") for d in dtypes - {torch.float32, target})
    if other:
        raise ValueError(
            f"precision={precision!r} autocasts float32 computations to {str(target).removeprefix('torch.')}, "
            f"but the encoder holds {', '.join(other)} weights; use precision=None"
            + ("" if "float64" in other else " or the precision of those weights")
        )


def check_sample_shapes(x: dict, tasks, *, one_task_per_pass=None) -> None:
    """Raise ``ValueError`` unless every task's samples have the first task's shape (one encoder takes them).

    ``one_task_per_pass=True`` (a merger with ``task_batching="sequential"``): tasks may differ, no
    pass mixes two tasks' samples, and whether the encoder takes each shape is checked by running
    it. ``False``: a merger whose passes hold several tasks (the error says how to avoid that);
    ``None``: an estimator without that choice.
    """
    if one_task_per_pass:
        return
    ref = tasks[0]
    hint = " (task_batching='sequential' runs one task per pass)" if one_task_per_pass is False else ""
    for t in tasks[1:]:
        if x[t].shape[1:] != x[ref].shape[1:]:
            raise ValueError(
                f"X[{t!r}] has samples of shape {tuple(x[t].shape[1:])}, X[{ref!r}] of shape "
                f"{tuple(x[ref].shape[1:])}: every task's inputs must fit the one encoder, and a pass "
                f"holding several tasks concatenates them{hint}"
            )


def feature_dims(skeleton, state: dict, x: dict, tasks, autocast_dtype=None) -> int:
    """The encoder's number of output features, the same for every task's input shape (one forward per shape)."""
    by_shape = {}
    for t in tasks:
        by_shape.setdefault((tuple(x[t].shape[1:]), x[t].dtype), t)
    dims = {t: feature_dim(skeleton, state, x[t], autocast_dtype) for t in by_shape.values()}
    if len(set(dims.values())) > 1:
        raise ValueError(
            "the encoder outputs a different number of features for different tasks' inputs "
            f"({', '.join(f'{d} for X[{t!r}] of shape {tuple(x[t].shape[1:])}' for t, d in dims.items())}): "
            "every task's features must have one size (the heads take them and the rotations act on them)"
        )
    return next(iter(dims.values()))


def feature_dim(skeleton, state: dict, x: torch.Tensor, autocast_dtype=None) -> int:
    """The encoder's number of output features, from one sample; a clear error if it returns no ``(batch, d)``."""
    device = next(iter(state.values())).device
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            z = encode(skeleton, state, x[:1].to(device))
    except RuntimeError as exc:
        if isinstance(exc, torch.OutOfMemoryError):  # not the inputs' fault: as it is
            raise
        halves = {v.dtype for v in state.values() if v.is_floating_point()} & {torch.bfloat16, torch.float16}
        hint = ""
        if autocast_dtype is None and len({v.dtype for v in state.values() if v.is_floating_point()}) > 1 and halves:
            name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[min(halves, key=str)]
            hint = f"; its weights mix float32 and half precision: such an encoder runs with precision={name!r}"
        raise ValueError(
            f"the encoder cannot take inputs of shape {tuple(x.shape[1:])} per sample ({exc}){hint}"
            + index_input_hint(x)
        ) from exc
    if not isinstance(z, torch.Tensor):
        hint = "wrap it in a module whose forward returns the features tensor (e.g. the pooled output)"
        if hasattr(skeleton, "encode_image") and isinstance(getattr(skeleton, "visual", None), nn.Module):
            hint = "this is a whole CLIP model: pass its image tower (`model.visual`) as each encoder"
        raise TypeError(
            f"the encoder must return a tensor of features (batch, features), got {type(z).__name__}; {hint}"
        )
    if z.ndim != 2:
        raise ValueError(f"the encoder must return (batch, features), got shape {tuple(z.shape)}")
    return int(z.shape[1])
