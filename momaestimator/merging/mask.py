"""The global mask over the multi-task vector: real scores, a hard binary forward pass.

MOMA learns one mask ``m`` shared by all tasks, with the shape of ``τ_MT``. We keep one real
score per entry and use the *hard* mask in every forward pass: the entries whose score is
among the lowest ``sparsity`` fraction (of the non-zero entries of ``τ_MT``) are removed, the
rest kept. Gradients reach the scores
through a straight-through sigmoid surrogate centred on the current threshold, so entries near
the keep/remove boundary are the ones that move. Because the fit-time forward already uses the
binary mask, absorbing it into the weights changes nothing (see :mod:`.absorb`).

Scores start at ``log|τ_MT|`` (plus a tiny seeded jitter to break ties), so the starting point is
the base merge with the smallest-magnitude ``sparsity`` fraction pruned — the closest binary mask
to the base merge.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

__all__ = ["GlobalMask", "masked_merge", "merge_entry", "score_gradient"]


def masked_merge(theta0: torch.Tensor, tau: torch.Tensor, keep, scaling: float) -> torch.Tensor:
    """``θ_0 + λ · (m ⊙ τ)`` — the one formula shared by fitting and absorption.

    ``keep`` is a boolean mask or ``None`` (keep everything).

    Parameters
    ----------
    theta0 : torch.Tensor
        Pretrained weights of one state-dict entry.
    tau : torch.Tensor
        The multi-task vector's entry, same shape.
    keep : torch.BoolTensor or None
        The mask (``True`` = keep), same shape; ``None`` keeps everything.
    scaling : float
        λ.

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> import torch
    >>> masked_merge(torch.zeros(3), torch.ones(3), torch.tensor([True, False, True]), 0.5)
    tensor([0.5000, 0.0000, 0.5000])
    """
    if keep is None:
        return theta0 + scaling * tau
    return theta0 + scaling * (tau * keep)


def merge_entry(scores, threshold, theta0, tau, scaling, out=None) -> torch.Tensor:
    """``θ_0 + λ (m ⊙ τ)`` of one entry with the hard mask ``m = scores > threshold``.

    The arithmetic of :func:`masked_merge` (so the same bits) written into one tensor: the
    mask as 1.0/0.0 straight into the output, then ``(m·τ)·λ + θ_0`` in place.

    Parameters
    ----------
    scores : torch.Tensor
        The entry's mask scores.
    threshold : torch.Tensor
        The cut (0-d).
    theta0, tau : torch.Tensor
        Pretrained weights and ``τ_MT`` of the entry.
    scaling : float
        λ.
    out : torch.Tensor, optional
        Where to write (default: a new tensor like ``tau``).

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> import torch
    >>> merge_entry(torch.tensor([1.0, -1.0]), torch.tensor(0.0), torch.zeros(2), torch.ones(2), 0.5)
    tensor([0.5000, 0.0000])
    """
    out = torch.empty_like(tau) if out is None else out
    torch.gt(scores.detach(), threshold, out=out)
    return out.mul_(tau).mul_(scaling).add_(theta0)


class _StraightThroughMerge(torch.autograd.Function):
    """Forward: merge with the hard mask. Backward: sigmoid surrogate of the mask.

    A Function so that backward recomputes the surrogate from the scores instead of keeping extra
    full-size tensors alive between forward and backward; one node per tensor so that each
    tensor's incoming gradient is freed as soon as it has been turned into a score gradient.
    """

    @staticmethod
    def forward(ctx, scores, threshold, theta0, tau, scaling):
        ctx.save_for_backward(scores, threshold, tau)
        ctx.scaling = scaling
        return masked_merge(theta0, tau, scores > threshold, scaling)

    @staticmethod
    def backward(ctx, grad_out):
        scores, threshold, tau = ctx.saved_tensors
        return score_gradient(grad_out, scores, threshold, tau, ctx.scaling), None, None, None, None


def score_gradient(grad_merged, scores, threshold, tau, scaling, *, out=None, buffer=None) -> torch.Tensor:
    """Straight-through gradient of the scores from the gradient of the merged weights.

    ``∂L/∂s = ∂L/∂θ · λ τ · σ'(s - t)``: the hard mask's derivative is replaced by that of a
    sigmoid centred on the cut ``t``. Works tensor by tensor; the result has the scores' dtype.

    Parameters
    ----------
    grad_merged : torch.Tensor
        ``∂L/∂θ`` of one merged entry.
    scores : torch.Tensor
        That entry's mask scores.
    threshold : torch.Tensor
        The current cut (:meth:`GlobalMask.threshold`).
    tau : torch.Tensor
        That entry of ``τ_MT``.
    scaling : float
        λ.
    out : torch.Tensor, optional
        Where to write the result (may be ``grad_merged`` itself, if it is float32: then no new
        full-size tensor is made).
    buffer : torch.Tensor, optional
        A contiguous float32 scratch tensor with at least ``scores.numel()`` entries, reused for
        the sigmoid instead of a new tensor (on a CPU a fresh tensor of a few MB is fresh pages
        from the system, each faulted in: the fit passes one buffer for all tensors).

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> import torch
    >>> score_gradient(torch.ones(2), torch.zeros(2), torch.tensor(0.0), torch.tensor([1.0, -2.0]), 1.0)
    tensor([ 0.2500, -0.5000])
    """
    if buffer is None:
        sig = torch.sub(scores.detach(), threshold).sigmoid_()
    else:
        sig = torch.sub(scores.detach(), threshold, out=buffer.view(-1)[: scores.numel()].view(scores.shape))
        sig.sigmoid_()
    if out is not None and out is grad_merged:
        grad = grad_merged.mul_(tau).mul_(scaling)
    elif grad_merged.dtype == sig.dtype:
        grad = torch.mul(grad_merged, tau).mul_(scaling)
    else:  # a half-precision encoder: the product in float32 (in float16, most of it underflows to 0)
        grad = grad_merged.to(sig.dtype).mul_(tau).mul_(scaling)
    if out is None:
        return torch.ops.aten.sigmoid_backward(grad, sig)  # grad · σ(1 - σ) in one pass
    return torch.ops.aten.sigmoid_backward.grad_input(grad, sig, grad_input=out)


def _kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest entry (1-based): selection on the CPU, a radix sort on a GPU (far faster
    there than ``kthvalue`` for a million entries); the same value either way.
    """
    if values.device.type == "cpu":
        return values.kthvalue(k).values
    return values.sort().values[k - 1]


class GlobalMask(nn.Module):
    """Learnable scores for a binary mask that removes a ``sparsity`` fraction of ``τ_MT``'s entries.

    One score per entry of ``τ_MT`` (a parameter per tensor); the cut is global over all tensors.
    The mask is ``scores > threshold`` in every forward pass, in every evaluation and in the
    result, so the mask a fit evaluates is the mask it returns.

    Only the non-zero entries of ``τ_MT`` count: an entry where no expert moved (or that TIES
    trimmed) is the same whether kept or removed, so it is never cut and ``sparsity`` is a
    fraction of the others.

    Parameters
    ----------
    multitask_vector : dict of str to torch.Tensor
        ``τ_MT``; the mask has the same keys and shapes.
    sparsity : float
        Fraction of the non-zero entries (over all tensors together) the mask removes, in [0, 1).
    generator : torch.Generator, optional
        Seeds the tie-breaking jitter (and the score sample of large models).

    Examples
    --------
    >>> import torch
    >>> tau = {"w": torch.tensor([0.1, -3.0, 0.0, 0.5, 2.0])}
    >>> mask = GlobalMask(tau, sparsity=0.5)
    >>> mask.binary()["w"]
    tensor([False,  True,  True, False,  True])
    """

    exact_threshold_max = 4_000_000
    sample_size = 1_000_000

    def __init__(self, multitask_vector: dict, sparsity: float, generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1:
            raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
        if not multitask_vector:
            raise ValueError("the multi-task vector is empty: nothing to mask")
        self.names = list(multitask_vector)
        numels = [multitask_vector[k].numel() for k in self.names]
        self.n_entries = sum(numels)
        self.n_total = sum(int(torch.count_nonzero(multitask_vector[k])) for k in self.names)
        self.n_remove = int(round(sparsity * self.n_total))
        never = torch.finfo(torch.float32).max  # the score of a zero entry: above every cut
        scores = []
        for k in self.names:  # tensor by tensor: no full-size temporaries
            tau = multitask_vector[k].detach()
            jitter = torch.rand(tau.shape, generator=generator, dtype=torch.float32).to(tau.device)
            score = torch.log(tau.abs().float().clamp_min(1e-30)).add_(jitter.mul_(1e-4))
            scores.append(nn.Parameter(score.masked_fill_(tau == 0, never)))
        self.scores = nn.ParameterList(scores)
        # Large models: the cut is the quantile of a fixed random sample of the scores (an exact
        # one reads all P scores, every step)
        self._sample = None
        if self.n_entries > self.exact_threshold_max and self.n_remove:
            flat_idx = torch.randint(self.n_entries, (self.sample_size,), generator=generator).sort().values
            bounds = torch.tensor([0, *numels]).cumsum(0)
            self._sample = []
            for i, s in enumerate(self.scores):
                sel = flat_idx[(flat_idx >= bounds[i]) & (flat_idx < bounds[i + 1])] - bounds[i]
                self._sample.append(sel.to(s.device))

    def _apply(self, fn, recurse=True):  # `.to(device)` also moves the sampled score indices
        super()._apply(fn, recurse)
        if self._sample is not None:
            self._sample = [idx.to(s.device) for idx, s in zip(self._sample, self.scores)]
        return self

    def threshold(self) -> torch.Tensor:
        """The cut: entries with a score above it are kept (in every step, evaluation and result).

        Up to ``exact_threshold_max`` entries the cut removes exactly ``n_remove`` of them; where
        several scores tie at it, it removes all of them or none, whichever count is closer to
        ``n_remove`` (none when both are as close). Larger models: the cut is the quantile of a
        fixed random sample of ``sample_size`` scores (an exact one reads all ``P`` scores), so
        the removed fraction is ``sparsity`` within sampling error.

        Returns
        -------
        torch.Tensor
            A 0-d tensor on the scores' device.
        """
        device = self.scores[0].device
        if self.n_remove == 0:
            return torch.tensor(-math.inf, device=device)
        if self._sample is not None:
            sample = torch.cat([s.detach().flatten()[idx] for s, idx in zip(self.scores, self._sample)])
            k = min(max(1, round(self.n_remove / self.n_entries * len(sample))), len(sample))
            return _kth_smallest(sample, k)
        values = torch.cat([s.detach().flatten() for s in self.scores])
        cut = _kth_smallest(values, self.n_remove)
        below, upto = int((values < cut).sum()), int((values <= cut).sum())
        if self.n_remove - below <= upto - self.n_remove:  # ties: removing none of them is as close or closer
            cut = torch.nextafter(cut, torch.tensor(-math.inf, device=device))
        return cut

    def merge(self, theta0: dict, tau: dict, scaling: float) -> dict[str, torch.Tensor]:
        """Differentiable ``θ_0 + λ (m ⊙ τ)`` with the hard mask (straight-through gradient).

        Parameters
        ----------
        theta0 : dict of str to torch.Tensor
            Pretrained state dict.
        tau : dict of str to torch.Tensor
            The multi-task vector (the keys of this mask).
        scaling : float
            λ.

        Returns
        -------
        dict of str to torch.Tensor
            The merged entries of ``tau``'s keys.
        """
        thr = self.threshold()
        return {
            k: _StraightThroughMerge.apply(s, thr, theta0[k], tau[k], scaling) for k, s in zip(self.names, self.scores)
        }

    @torch.no_grad()
    def merge_into(self, out: dict, theta0: dict, tau: dict, scaling: float, threshold=None) -> None:
        """Write ``θ_0 + λ (m ⊙ τ)`` with the current hard mask into the tensors of ``out``, in place.

        The same arithmetic as :func:`masked_merge` (so the same bits), without new full-size
        tensors: fitting keeps one set of merged weights for its whole run.

        Parameters
        ----------
        out : dict of str to torch.Tensor
            Preallocated tensors for some or all keys of this mask, overwritten (other keys are
            left out).
        theta0, tau : dict of str to torch.Tensor
            Pretrained weights and ``τ_MT``.
        scaling : float
            λ.
        threshold : torch.Tensor, optional
            The cut (default: :meth:`threshold`).
        """
        thr = self.threshold() if threshold is None else threshold
        pairs = [(k, s) for k, s in zip(self.names, self.scores) if k in out]
        leaves = [out[k] for k, _ in pairs]
        if leaves and leaves[0].device.type != "cpu":
            # multi-tensor ops: a few kernel launches for all tensors, same arithmetic as masked_merge
            torch._foreach_copy_(leaves, [tau[k] for k, _ in pairs])
            torch._foreach_mul_(leaves, [s.detach() > thr for _, s in pairs])
            torch._foreach_mul_(leaves, scaling)
            torch._foreach_add_(leaves, [theta0[k] for k, _ in pairs])
            return
        for (k, s), w in zip(pairs, leaves):  # CPU: tensor by tensor, while it is in cache
            # no temporary (each one would be fresh pages faulted in): see merge_entry
            merge_entry(s, thr, theta0[k], tau[k], scaling, out=w)

    @torch.no_grad()
    def state(self) -> list[torch.Tensor]:
        """Copies of the scores (for keeping the best state seen)."""
        return [s.detach().clone() for s in self.scores]

    @torch.no_grad()
    def load(self, state) -> None:
        """Restore scores saved by :meth:`state`.

        Parameters
        ----------
        state : list of torch.Tensor
            As returned by :meth:`state`.
        """
        for s, v in zip(self.scores, state):
            s.copy_(v)

    @torch.no_grad()
    def binary(self) -> dict[str, torch.Tensor]:
        """The binary mask of the current scores, ``scores > threshold()`` (``True`` = keep).

        The mask every forward pass and evaluation uses, so the one a fit returns is the one it
        evaluated.

        Returns
        -------
        dict of str to torch.BoolTensor
        """
        thr = self.threshold()
        return {k: s.detach() > thr for k, s in zip(self.names, self.scores)}
