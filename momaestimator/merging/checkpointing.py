"""Recomputation inside an encoder's blocks, for the functional calls the fit makes.

Two things a fit pass would otherwise keep can be recomputed block by block in the backward pass:
the blocks' *activations* (gradient checkpointing) and the *merged weights* themselves
(:class:`BlockMerge`).

A fit pass keeps every intermediate activation of the encoder until its backward pass: for a
ViT-B/32 about 30 MB per image in float32, which is what grows a pass's memory with its samples.
With checkpointing, each selected block (a transformer's residual blocks) keeps only its input; its
activations are recomputed, block by block, during the backward pass — the same numbers, about one
more forward pass of compute, and the activation memory of one block instead of all of them.

The fit runs a weightless *structure copy* of the user's encoder through
:func:`torch.func.functional_call`, so the weights a block uses exist only during that call. A
patched block therefore captures the tensors it runs with and recomputes with exactly those
(another functional call, on the same tensors); the user's own modules are never patched.

With a :class:`BlockMerge`, a block's merged weights ``θ_0 + λ (m ⊙ τ)`` are not kept for the whole
fit: the block computes them from the mask scores when it runs, and autograd keeps, instead of each
merged tensor it would save for backward, a recipe that computes it again (the same bits). The
merged weights then exist one block at a time, and their gradient goes to the scores.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from .mask import merge_entry

__all__ = ["BlockMerge", "checkpoint_blocks", "find_blocks", "recompute_blocks"]

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


class _MergeForScores(torch.autograd.Function):
    """Forward: the merged entry. Backward: ``∂L/∂θ`` itself, handed to the scores as is.

    The scores' gradient buffer thus accumulates ``∂L/∂θ`` over the passes of a step, as the merged
    weights' own buffer did; the fit turns it into the straight-through score gradient once
    (:func:`.mask.score_gradient`), so nothing full-size is saved here.
    """

    @staticmethod
    def forward(ctx, scores, threshold, theta0, tau, scaling):
        ctx.dtype = scores.dtype
        return merge_entry(scores, threshold, theta0, tau, scaling)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out.to(ctx.dtype), None, None, None, None


@dataclass(frozen=True)
class _Recipe:
    key: str
    size: torch.Size
    stride: tuple
    offset: int


@dataclass(eq=False)
class BlockMerge:
    """The merged weights of the blocks' entries, computed where they are used.

    ``θ_0 + λ (m ⊙ τ)`` for each key of ``scores``, with the hard mask ``scores > threshold``;
    differentiable (its gradient, ``∂L/∂θ``, accumulates in the scores' ``.grad``) when gradients
    are recorded.

    Parameters
    ----------
    scores : dict of str to torch.Tensor
        Mask scores of the entries merged in their blocks, by state-dict key (leaves requiring
        gradients).
    theta0, tau : dict of str to torch.Tensor
        Pretrained weights and ``τ_MT`` (at least the keys of ``scores``).
    scaling : float
        λ.
    threshold : torch.Tensor
        The cut (0-d; the fit rewrites it in place each step).

    Examples
    --------
    >>> import torch
    >>> s = {"w": torch.tensor([1.0, -1.0], requires_grad=True)}
    >>> bm = BlockMerge(s, {"w": torch.zeros(2)}, {"w": torch.ones(2)}, 0.5, torch.tensor(0.0))
    >>> w = bm.weight("w")
    >>> w.detach(), w.requires_grad
    (tensor([0.5000, 0.0000]), True)
    """

    scores: dict
    theta0: dict
    tau: dict
    scaling: float
    threshold: torch.Tensor

    def weight(self, key: str) -> torch.Tensor:
        """The merged entry ``key`` (recorded by autograd when gradients are enabled).

        Parameters
        ----------
        key : str
            State-dict key (one of ``scores``).

        Returns
        -------
        torch.Tensor
        """
        args = (self.scores[key], self.threshold, self.theta0[key], self.tau[key], self.scaling)
        if torch.is_grad_enabled():
            return _MergeForScores.apply(*args)
        return merge_entry(*args)

    @contextlib.contextmanager
    def recipes(self, merged: dict):
        """Within the block: autograd saves a recipe instead of any view of a ``merged`` tensor.

        Parameters
        ----------
        merged : dict of str to torch.Tensor
            State-dict key to the merged tensor the block runs with.
        """
        # addresses, not tensors: autograd keeps this hook with every tensor it saves, and a
        # reference here would keep the merged tensors alive (they are, while the block runs)
        by_storage = {
            w.untyped_storage().data_ptr(): (key, w.dtype, w.device) for key, w in merged.items() if w.numel()
        }

        def pack(t):
            try:
                hit = by_storage.get(t.untyped_storage().data_ptr()) if t.numel() else None
            except (RuntimeError, NotImplementedError):  # tensors without a plain storage
                hit = None
            if hit is None or hit[1] != t.dtype or hit[2] != t.device:
                return t
            return _Recipe(hit[0], t.size(), t.stride(), t.storage_offset())

        def unpack(saved):
            if not isinstance(saved, _Recipe):
                return saved
            with torch.no_grad():
                w = self.weight(saved.key)
            return w.as_strided(saved.size, saved.stride, saved.offset)

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield


def _block_forward(module: nn.Module, forward, prefix: str, activations: bool, merge, *args, **kwargs):
    # Inside the recomputation (or the block's own call), the block runs as it is.
    if module.__dict__.get(_INSIDE):
        return forward(*args, **kwargs)
    grad = torch.is_grad_enabled()
    if merge is None and not (activations and grad):  # teacher targets, evaluation
        return forward(*args, **kwargs)
    # The tensors the block runs with now (the functional call's): the recomputation in backward,
    # when the call is over, swaps exactly these in again; merged entries are computed here.
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    keys = {}
    if merge is not None:
        keys = {name: prefix + name for name in tensors if prefix + name in merge.scores}

    def run(recipes, *a, **kw):
        merged = {name: merge.weight(key) for name, key in keys.items()}
        module.__dict__[_INSIDE] = True
        try:
            with merge.recipes({keys[n]: w for n, w in merged.items()}) if recipes else contextlib.nullcontext():
                return functional_call(module, {**tensors, **merged}, a, kw, strict=False, tie_weights=True)
        finally:
            module.__dict__[_INSIDE] = False

    if activations and grad:
        # no RNG state to preserve: the fit runs the encoder in eval mode (and CUDA graphs cannot
        # capture the RNG state's save and restore)
        run = functools.partial(run, False)  # the checkpoint drops everything, merged weights too
        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)
    return run(grad and bool(keys), *args, **kwargs)


def recompute_blocks(skeleton: nn.Module, names, *, activations: bool = True, merge: BlockMerge | None = None):
    """A copy of ``skeleton`` whose blocks ``names`` recompute in backward what a pass would keep.

    Forward values and gradients are those of ``skeleton`` run with the same tensors; only the
    memory held between forward and backward changes. Under ``torch.no_grad()`` the blocks run
    as they are (with ``merge``: on merged weights computed block by block).

    Parameters
    ----------
    skeleton : torch.nn.Module
        A structure copy (:func:`.functional.structure_copy`) run through ``functional_call``;
        not modified.
    names : list of str
        Qualified names of the blocks (:func:`find_blocks`).
    activations : bool, default=True
        Recompute the blocks' activations (gradient checkpointing).
    merge : BlockMerge, optional
        Compute the merged entries of ``merge.scores`` inside their blocks, and again in backward,
        instead of taking them from the functional call (leave those keys out of its state: the
        placeholders stay, so a use outside the block fails loudly instead of running on other
        weights).

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> from momaestimator.merging.functional import encode, structure_copy
    >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 4))
    >>> state = {k: v.detach().requires_grad_() for k, v in enc.state_dict().items()}
    >>> ckpt = recompute_blocks(structure_copy(enc), ["0", "2"])
    >>> x = torch.randn(3, 4)
    >>> torch.equal(encode(ckpt, state, x), enc(x))
    True
    """
    copied = copy.deepcopy(skeleton)
    for name in names:
        block = copied.get_submodule(name)
        block.forward = functools.partial(_block_forward, block, block.forward, f"{name}.", activations, merge)
    return copied


def checkpoint_blocks(skeleton: nn.Module, names) -> nn.Module:
    """A copy of ``skeleton`` whose blocks ``names`` recompute their activations in backward.

    Forward values and gradients are those of ``skeleton`` (the same operations on the same
    tensors, run twice); only the memory held between forward and backward changes. Under
    ``torch.no_grad()`` the blocks run as they are. Same as :func:`recompute_blocks` with its
    defaults.

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
    >>> enc = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    >>> skeleton = structure_copy(enc)
    >>> ckpt = checkpoint_blocks(skeleton, find_blocks(skeleton))
    >>> state = {k: v.detach().requires_grad_() for k, v in enc.state_dict().items()}
    >>> encode(ckpt, state, torch.ones(2, 4)).sum().backward()  # the blocks recompute in here
    >>> enc(torch.ones(2, 4)).sum().backward()
    >>> torch.allclose(state["0.weight"].grad, enc[0].weight.grad)
    True
    """
    return recompute_blocks(skeleton, names)
