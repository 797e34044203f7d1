"""Task vectors and the state-dict plumbing every merge shares.

A task vector is ``τ_t = θ_t − θ_0`` over the floating-point entries of a state dict
(integer buffers such as step counters are never merged: they come from ``θ_0``).
Everything here works one tensor at a time: no function builds a ``T × P`` matrix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["as_state_dict", "as_task_dict", "is_mergeable", "task_vector"]


def as_state_dict(model, *, name: str = "model") -> dict[str, torch.Tensor]:
    """Return a ``{name: tensor}`` view of a module or state dict, without copying.

    Parameters
    ----------
    model : torch.nn.Module or Mapping of str to torch.Tensor
        The model. Tensors are returned detached; they share storage with the input,
        so callers must never modify them in place. A module's tied tensors (one parameter
        under two names) are one entry, under the first name of its state dict.
    name : str, default="model"
        How error messages refer to ``model``.

    Returns
    -------
    dict of str to torch.Tensor

    Examples
    --------
    >>> import torch
    >>> sorted(as_state_dict(torch.nn.Linear(2, 1)))
    ['bias', 'weight']
    """
    if isinstance(model, nn.Module):
        out, seen = {}, set()
        for k, v in model.state_dict(keep_vars=True).items():
            if v is not None and id(v) not in seen:  # a tied tensor is one entry, under its first name
                seen.add(id(v))
                out[k] = v.detach()
        return out
    if isinstance(model, Mapping):
        out = {}
        for k, v in model.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"{name}[{k!r}] must be a torch.Tensor, got {type(v).__name__}")
            out[str(k)] = v.detach()
        return out
    raise TypeError(f"{name} must be a torch.nn.Module or a state dict, got {type(model).__name__}")


def string_keyed(mapping: Mapping, name: str) -> dict[str, object]:
    """``mapping`` with its keys as strings; two keys with the same string (``0`` and ``"0"``) are refused.

    Examples
    --------
    >>> string_keyed({0: "a", "b": "c"}, "X")
    {'0': 'a', 'b': 'c'}
    """
    out, original = {}, {}
    for key, value in mapping.items():
        task = str(key)
        if task in out:
            raise ValueError(
                f"{name} has the keys {original[task]!r} and {key!r}, which name the same task {task!r} "
                "(task names are compared as strings)"
            )
        out[task], original[task] = value, key
    return out


def as_task_dict(models, *, name: str = "finetuned") -> dict[str, object]:
    """Normalise ``{task: model}`` or a list of models into an ordered ``{task: model}`` dict.

    Lists name their tasks by position (``"0"``, ``"1"``, ...).

    Examples
    --------
    >>> list(as_task_dict(["m0", "m1"]))
    ['0', '1']
    """
    if isinstance(models, Mapping):
        if not models:
            raise ValueError(f"{name} is empty: give at least one task")
        return string_keyed(models, name)
    if isinstance(models, Sequence) and not isinstance(models, (str, bytes)):
        if len(models) == 0:
            raise ValueError(f"{name} is empty: give at least one task")
        return {str(i): m for i, m in enumerate(models)}
    raise TypeError(f"{name} must be a dict {{task: model}} or a list of models, got {type(models).__name__}")


def is_mergeable(tensor: torch.Tensor) -> bool:
    """Whether a state-dict entry takes part in merging (floating point tensors only)."""
    return tensor.is_floating_point()


def task_vector(pretrained, finetuned) -> dict[str, torch.Tensor]:
    """Compute the task vector ``τ = θ_ft − θ_0`` of one fine-tuned model.

    Parameters
    ----------
    pretrained : torch.nn.Module or dict of str to torch.Tensor
        The pretrained model ``θ_0``.
    finetuned : torch.nn.Module or dict of str to torch.Tensor
        A fine-tuned model of the same architecture.

    Returns
    -------
    dict of str to torch.Tensor
        One new tensor per floating-point entry.

    Examples
    --------
    >>> import torch
    >>> task_vector({"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.5, 1.0])})
    {'w': tensor([ 0.5000, -1.0000])}
    """
    pre = as_state_dict(pretrained, name="pretrained")
    ft = as_state_dict(finetuned, name="finetuned")
    check_same_keys(pre, {"finetuned": ft})
    return {k: ft[k].to(v.device) - v for k, v in pre.items() if is_mergeable(v)}  # on θ_0's device


def check_same_keys(pre: dict, finetuned: dict[str, dict]) -> None:
    """Raise a ``ValueError`` naming the first entry where a fine-tuned state dict differs from ``pre``."""
    for task, ft in finetuned.items():
        missing = [k for k in pre if k not in ft]
        extra = [k for k in ft if k not in pre]
        if missing or extra:
            raise ValueError(
                f"model for task {task!r} does not match the pretrained architecture: "
                f"missing entries {missing[:5]}, unexpected entries {extra[:5]}"
            )
        for k, v in pre.items():
            if ft[k].shape != v.shape:
                raise ValueError(
                    f"model for task {task!r}: entry {k!r} has shape {tuple(ft[k].shape)}, "
                    f"pretrained has {tuple(v.shape)}"
                )
