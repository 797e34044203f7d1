"""Running a user's module on other weights without touching it.

The estimator never mutates a user's modules. It runs them through
:func:`torch.func.functional_call` on a *structure copy*: a deep copy whose parameters and
persistent buffers are placeholders on the ``meta`` device (no memory), switched to eval mode.
The same trick builds the absorbed model: a deep copy whose parameters are the merged tensors.
"""

from __future__ import annotations

import copy
import functools
import weakref

import torch
from torch import nn
from torch.func import functional_call

from .task_vectors import as_state_dict

_CHECKPOINT_FLAGS = ("grad_checkpointing", "gradient_checkpointing")

__all__ = [
    "absorb_heads",
    "clone_with_state",
    "encode",
    "first_linear_weight",
    "plain_head",
    "rotation_mismatch",
    "structure_copy",
    "with_autograd",
]


def with_autograd(fit):
    """Decorate a ``fit`` so that it runs with autograd on, whatever the caller's grad mode.

    A fit called inside ``torch.no_grad()`` or ``torch.inference_mode()`` (common in evaluation
    code) would otherwise fail in its first backward pass. The caller's mode is restored on return.

    Parameters
    ----------
    fit : callable

    Returns
    -------
    callable

    Examples
    --------
    >>> import torch
    >>> @with_autograd
    ... def grad_mode():
    ...     return torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    >>> with torch.inference_mode():
    ...     grad_mode()
    (True, False)
    """

    @functools.wraps(fit)
    def fit_with_autograd(*args, **kwargs):
        with torch.inference_mode(False), torch.enable_grad():
            return fit(*args, **kwargs)

    return fit_with_autograd


def _persistent_tensors(module: nn.Module):
    """``(qualified_name, owner_module, attr, tensor, is_param)`` for every state-dict tensor."""
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in mod._parameters.items():
            if p is not None:
                yield prefix + attr, p, True
        for attr, b in mod._buffers.items():
            if b is not None and attr not in mod._non_persistent_buffers_set:
                yield prefix + attr, b, False


def _copy_with(module: nn.Module, replace) -> nn.Module:
    memo = {}
    for name, tensor, is_param in _persistent_tensors(module):
        if id(tensor) in memo:
            continue
        new = replace(name, tensor)
        memo[id(tensor)] = nn.Parameter(new, requires_grad=tensor.requires_grad) if is_param else new
    return copy.deepcopy(module, memo)


def structure_copy(module: nn.Module, device=None) -> nn.Module:
    """A weightless copy of ``module`` in eval mode, for :func:`torch.func.functional_call`.

    Parameters
    ----------
    module : torch.nn.Module
        The module to copy; not modified.
    device : str or torch.device, optional
        Where the non-persistent buffers (which are not in the state dict) go.

    Returns
    -------
    torch.nn.Module
        Same class and structure, parameters and buffers on the ``meta`` device. Activation
        checkpointing flags of the modules (``grad_checkpointing``, ``gradient_checkpointing``)
        are turned off in the copy: they would recompute after the functional call, without its
        weights.

    Examples
    --------
    >>> import torch
    >>> s = structure_copy(torch.nn.Linear(2, 3))
    >>> s.weight.device.type, s.training
    ('meta', False)
    """
    skeleton = _copy_with(module, lambda name, t: torch.empty_like(t, device="meta"))
    skeleton.eval()
    for mod in skeleton.modules():
        # A module's own activation checkpointing (open_clip's and timm's `grad_checkpointing`,
        # Hugging Face's `gradient_checkpointing`) would recompute in backward, after the functional
        # call is over, on these placeholders; the fit has its own (`gradient_checkpointing`).
        for flag in _CHECKPOINT_FLAGS:
            if mod.__dict__.get(flag) is True:
                setattr(mod, flag, False)
    if device is not None:
        for mod in skeleton.modules():
            for attr in mod._non_persistent_buffers_set:
                if mod._buffers.get(attr) is not None:
                    mod._buffers[attr] = mod._buffers[attr].to(device)
    return skeleton


def clone_with_state(module: nn.Module, state: dict) -> nn.Module:
    """A real copy of ``module`` (same class) whose state-dict tensors are taken from ``state``.

    Parameters
    ----------
    module : torch.nn.Module
        The module whose class and structure are copied; not modified.
    state : dict of str to torch.Tensor
        One tensor per state-dict entry of ``module`` (copied).

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> lin = torch.nn.Linear(1, 1)
    >>> new = clone_with_state(lin, {"weight": torch.ones(1, 1), "bias": torch.zeros(1)})
    >>> float(new(torch.ones(1, 1)).detach()), new is lin
    (1.0, False)
    """
    return _copy_with(module, lambda name, t: state[name].detach().clone())


_BUFFER_NAMES = weakref.WeakKeyDictionary()


def private_buffers(skeleton: nn.Module, state: dict) -> dict:
    """``state`` with the entries that are buffers of ``skeleton`` copied.

    A forward pass may update buffers in place even in eval mode (a quantization observer, a
    call counter); run on the copies, it never writes into the tensors of ``state``, which are
    often the user's own (parameters are only read by any forward this library runs).
    """
    names = _BUFFER_NAMES.get(skeleton)
    if names is None:
        names = _BUFFER_NAMES[skeleton] = frozenset(name for name, _ in skeleton.named_buffers(remove_duplicate=False))
    if not names:
        return state
    return {k: v.clone() if k in names else v for k, v in state.items()}


def encode(skeleton: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    """``skeleton`` evaluated with the tensors of ``state`` on input ``x``.

    Tied tensors take the value of the one name ``state`` gives them (see
    :func:`~momaestimator.merging.task_vectors.as_state_dict`). The tensors of ``state`` are not
    written to, even by a forward that updates its buffers (:func:`private_buffers`).
    """
    return functional_call(skeleton, private_buffers(skeleton, state), (x,), strict=False, tie_weights=True)


def first_linear_weight(head: nn.Module, *, name: str = "head") -> str:
    """State-dict name of the weight of the linear map a head applies first.

    A head is an ``nn.Linear`` (or subclass), any module exposing a 2-D ``weight`` (such as
    :class:`momaestimator.LinearHead` or the task_vectors release's ``ClassificationHead``, which
    may L2-normalise their input first), or an ``nn.Sequential`` whose first layer is one of these.

    Parameters
    ----------
    head : torch.nn.Module
        The classification head.
    name : str, default="head"
        How error messages call the head.

    Returns
    -------
    str

    Raises
    ------
    TypeError
        If the head has no supported first linear map.

    Examples
    --------
    >>> import torch
    >>> first_linear_weight(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()))
    '0.weight'
    """
    if isinstance(head, nn.Sequential):
        if len(head) == 0:
            raise TypeError(f"{name} is an empty nn.Sequential; its first operation must be linear")
        return "0." + first_linear_weight(head[0], name=name)
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return "weight"
    raise TypeError(
        f"{name} ({type(head).__name__}) is not a supported head: expected nn.Linear, a module with a 2-D "
        "`weight` (e.g. LinearHead), or an nn.Sequential starting with one"
    )


def _weight_hooks(module: nn.Module) -> dict:
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return {k: h for k, h in module._forward_pre_hooks.items() if isinstance(h, (WeightNorm, SpectralNorm))}


def plain_head(head: nn.Module) -> nn.Module:
    """``head``, or, if a parametrization computes any of its weights (``weight_norm``,
    ``spectral_norm``, new-style or the older hooks), a copy holding its effective (eval-mode)
    weights as plain parameters: the same function, with a ``weight`` entry to rotate. The user's
    head is not modified.

    Parameters
    ----------
    head : torch.nn.Module

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> import torch
    >>> head = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 3))
    >>> sorted(plain_head(head).state_dict())
    ['bias', 'weight']
    """
    from torch.nn.utils import parametrize

    mods = [m for m in head.modules() if parametrize.is_parametrized(m) or _weight_hooks(m)]
    if not mods:
        return head
    # the older hooks keep the computed weight as a plain (non-leaf) attribute, which deepcopy refuses
    memo = {
        id(m.__dict__[h.name]): m.__dict__[h.name].detach().clone() for m in mods for h in _weight_hooks(m).values()
    }
    plain = copy.deepcopy(head, memo)
    training = {m: m.training for m in plain.modules()}
    plain.eval()  # the weights as the head computes them in eval (no spectral-norm power iteration)
    with torch.no_grad():
        for m in plain.modules():
            if parametrize.is_parametrized(m):
                # not parametrize.remove_parametrizations: it edits the parametrized class, which the
                # user's head shares with this copy
                values = {
                    name: (getattr(m, name).detach().clone(), any(p.requires_grad for p in chain.parameters()))
                    for name, chain in m.parametrizations.items()
                }
                del m._modules["parametrizations"]
                m.__class__ = m.__class__.__bases__[0]
                for name, (value, grad) in values.items():
                    m.register_parameter(name, nn.Parameter(value, requires_grad=grad))
            for hook in _weight_hooks(m).values():  # torch's removers drop their state-dict hooks too
                remove = (
                    nn.utils.remove_weight_norm
                    if type(hook).__name__ == "WeightNorm"
                    else nn.utils.remove_spectral_norm
                )
                remove(m, hook.name)
            for key, pre_hook in list(m._load_state_dict_pre_hooks.items()):
                # torch's remove_spectral_norm misses its own load pre-hook (registered wrapped)
                if type(getattr(pre_hook, "hook", pre_hook)).__name__ == "SpectralNormLoadStateDictPreHook":
                    del m._load_state_dict_pre_hooks[key]
    for m, flag in training.items():
        m.training = flag
    return plain


@torch.no_grad()
def rotation_mismatch(head: nn.Module, *, n_samples: int = 8, seed: int = 0) -> float:
    """How far a head is from absorbing rotations: ``head(z Qᵀ)`` against the head with ``W ← W Q``.

    Absorption (:func:`absorb_heads`) replaces a rotation of the features by a rotation of the
    weight of the head's first linear map. That is exact when the head applies that map to its
    input, optionally after an L2 normalisation (norms are rotation invariant); a head that
    transforms its input first (centring, a layer norm) breaks it. Both sides are evaluated in
    float64 on random features and a random orthogonal ``Q``.

    Parameters
    ----------
    head : torch.nn.Module
        The head; not modified (it runs on a structure copy).
    n_samples : int, default=8
        Random feature vectors to compare on.
    seed : int, default=0
        Seed of the features and of ``Q``.

    Returns
    -------
    float
        ``max |difference| / max |logits|``: about 1e-15 for a head that absorbs rotations.

    Examples
    --------
    >>> import torch
    >>> from momaestimator import LinearHead
    >>> rotation_mismatch(LinearHead(torch.randn(3, 4))) < 1e-12
    True
    >>> class Centred(torch.nn.Linear):
    ...     def forward(self, z):
    ...         return super().forward(z - z.mean(-1, keepdim=True))
    >>> rotation_mismatch(Centred(4, 3)) > 1e-3
    True
    """
    head = plain_head(head)
    wname = first_linear_weight(head)
    # a tensor used twice (tied) is one entry, under its first name; float64: on the CPU
    state = {k: v.cpu().double() if v.is_floating_point() else v.cpu() for k, v in as_state_dict(head).items()}
    skeleton = structure_copy(head, device="cpu").double()
    gen = torch.Generator().manual_seed(seed)
    dim = state[wname].shape[1]
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    z = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64)
    rotated_input = functional_call(skeleton, state, (z @ q.T,), strict=False)
    rotated_weight = functional_call(skeleton, {**state, wname: state[wname] @ q}, (z,), strict=False)
    scale = rotated_input.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((rotated_input - rotated_weight).abs().max() / scale)


def absorb_heads(heads: dict, rotations: dict) -> dict[str, nn.Module]:
    """New heads with ``W ← W · Q_t`` in their first linear map (exact for normalising heads too).

    Parameters
    ----------
    heads : dict of str to torch.nn.Module
        The original heads; not modified.
    rotations : dict of str to torch.Tensor
        ``Q_t`` (``d × d``) per task.

    Returns
    -------
    dict of str to torch.nn.Module
        Copies of the heads with ``W_t Q_t`` as the weight of their first linear map.

    Examples
    --------
    >>> import torch
    >>> from momaestimator import LinearHead
    >>> q = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    >>> new = absorb_heads({"a": LinearHead(torch.eye(2))}, {"a": q})["a"]
    >>> torch.equal(new.weight, q)
    True
    """
    out = {}
    for task, head in heads.items():
        head = plain_head(head)
        wname = first_linear_weight(head, name=f"heads[{task!r}]")
        state = {k: v.detach() for k, v in head.state_dict(keep_vars=True).items()}
        w = state[wname]
        # in float64 on the CPU, rounded once to the head's dtype (a bf16 product rounds every step)
        q = rotations[task].to(device="cpu", dtype=torch.float64)
        state[wname] = (w.to(device="cpu", dtype=torch.float64) @ q).to(device=w.device, dtype=w.dtype)
        out[task] = clone_with_state(head, state)
    return out
