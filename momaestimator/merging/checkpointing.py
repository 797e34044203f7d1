"""Gradient checkpointing of an encoder's blocks, for the functional calls the fit makes.

A fit pass keeps every intermediate activation of the encoder until its backward pass: for a
ViT-B/32 about 30 MB per image in float32, which is what grows a pass's memory with its samples.
With checkpointing, each selected block (a transformer's residual blocks) keeps only its input; its
activations are recomputed, block by block, during the backward pass — the same numbers, about one
more forward pass of compute, and the activation memory of one block instead of all of them.

The fit runs a weightless *structure copy* of the user's encoder through
:func:`torch.func.functional_call`, so the weights a block uses exist only during that call. A
patched block therefore captures the tensors it runs with and recomputes with exactly those
(another functional call, on the same tensors); the user's own modules are never patched.
"""

from __future__ import annotations

import copy
import functools
import inspect

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpoint_blocks", "find_blocks"]

_INSIDE = "_momaestimator_recomputing"


def _has_state(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _within(name: str, chosen) -> bool:
    """Whether module ``name`` is one of ``chosen`` or inside one of them."""
    return any(name == c or name.startswith(c + ".") for c in chosen)


def _repeated_blocks(module: nn.Module) -> list[str]:
    """The children of every ``ModuleList``/``Sequential`` whose children are all of one class and
    hold tensors (outermost only: nothing inside a block already chosen).
    """
    names = []
    for name, mod in module.named_modules():
        if _within(name, names) or not isinstance(mod, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(mod.named_children())
        if not children or len({type(c) for _, c in children}) != 1 or not all(_has_state(c) for _, c in children):
            continue
        names += [f"{name}.{child}" if name else child for child, _ in children]
    return names


def _blocks_of_types(module: nn.Module, types: tuple) -> list[str]:
    names = []
    for name, mod in module.named_modules():
        if name and isinstance(mod, types) and not _within(name, names):
            names.append(name)
    return names


def find_blocks(module: nn.Module, blocks=True) -> list[str]:
    """Qualified names of the submodules of ``module`` that gradient checkpointing recomputes.

    Parameters
    ----------
    module : torch.nn.Module
        The encoder (only read).
    blocks : bool, type or tuple of types, default=True
        ``True``: the repeated blocks — the children of every ``nn.ModuleList`` or
        ``nn.Sequential`` whose children are all of one class and hold weights (open_clip's
        ``transformer.resblocks.*``, timm's ``blocks.*``, the blocks of a torchvision ResNet's
        stages). A module class or tuple of classes: every submodule of those classes. Either way
        only the outermost matches (nothing inside a chosen block). ``False``: none.

    Returns
    -------
    list of str

    Raises
    ------
    TypeError
        If ``blocks`` is none of the above.
    ValueError
        If ``blocks`` asks for checkpointing and ``module`` has no such submodule.

    Examples
    --------
    >>> import torch
    >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> find_blocks(enc)
    ['0', '1']
    >>> find_blocks(enc, torch.nn.Linear)
    ['0', '1']
    """
    if blocks is False or blocks is None:
        return []
    if blocks is True:
        names = _repeated_blocks(module)
        what = "no repeated blocks (an nn.ModuleList or nn.Sequential of modules of one class holding weights)"
    else:
        types = blocks if isinstance(blocks, tuple) else (blocks,)
        if not types or not all(inspect.isclass(t) and issubclass(t, nn.Module) for t in types):
            raise TypeError(
                f"gradient_checkpointing must be True, False, an nn.Module subclass or a tuple of them, got {blocks!r}"
            )
        names = _blocks_of_types(module, types)
        what = f"no submodule of class {' or '.join(t.__name__ for t in types)}"
    if not names:
        raise ValueError(
            f"gradient_checkpointing={blocks!r}: the encoder ({type(module).__name__}) has {what}; "
            "name the block class(es) to recompute, or pass False"
        )
    return names


def _recomputed_forward(module: nn.Module, forward, *args, **kwargs):
    # Inside the recomputation, and wherever no graph is recorded (teacher targets, evaluation),
    # the block runs as it is.
    if module.__dict__.get(_INSIDE) or not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    # The tensors the block runs with now (the functional call's merged weights): the recomputation
    # in backward, when the call is over, swaps exactly these in again.
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}

    def run(*a, **kw):
        module.__dict__[_INSIDE] = True
        try:
            return functional_call(module, tensors, a, kw, strict=False, tie_weights=False)
        finally:
            module.__dict__[_INSIDE] = False

    # no RNG state to preserve: the fit runs the encoder in eval mode (and CUDA graphs cannot
    # capture the RNG state's save and restore)
    return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def checkpoint_blocks(skeleton: nn.Module, names) -> nn.Module:
    """A copy of ``skeleton`` whose blocks ``names`` recompute their activations in backward.

    Forward values and gradients are those of ``skeleton`` (the same operations on the same
    tensors, run twice); only the memory held between forward and backward changes. Under
    ``torch.no_grad()`` the blocks run as they are.

    Parameters
    ----------
    skeleton : torch.nn.Module
        A structure copy (:func:`.functional.structure_copy`) run through ``functional_call``;
        not modified.
    names : list of str
        Qualified names of the blocks (:func:`find_blocks`).

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> from momaestimator.merging.functional import encode, structure_copy
    >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    >>> state = {k: v.detach().requires_grad_() for k, v in enc.state_dict().items()}
    >>> ckpt = checkpoint_blocks(structure_copy(enc), ["0", "2"])
    >>> x = torch.randn(3, 4)
    >>> torch.equal(encode(ckpt, state, x), enc(x))
    True
    """
    copied = copy.deepcopy(skeleton)
    for name in names:
        block = copied.get_submodule(name)
        block.forward = functools.partial(_recomputed_forward, block, block.forward)
    return copied
