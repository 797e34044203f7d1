"""The global mask over the multi-task vector: real scores, a hard binary forward pass.

MOMA learns one mask ``m`` shared by all tasks, with the shape of ``τ_MT``. We keep one real
score per entry and use the *hard* mask in every forward pass: the entries whose score is
among the lowest ``sparsity`` fraction are removed, the rest kept. Gradients reach the scores
through a straight-through sigmoid surrogate centred on the current threshold, so entries near
the keep/remove boundary are the ones that move. Because the fit-time forward already uses the
binary mask, absorbing it into the weights changes nothing (see :mod:`.absorb`).

Scores start at ``log|τ_MT|`` (plus a tiny seeded jitter to break ties), so the starting point is
the base merge with the smallest-magnitude ``sparsity`` fraction pruned — the closest binary mask
to the base merge.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GlobalMask", "masked_merge"]


def masked_merge(theta0: torch.Tensor, tau: torch.Tensor, keep, scaling: float) -> torch.Tensor:
    """``θ_0 + λ · (m ⊙ τ)`` — the one formula shared by fitting and absorption.

    ``keep`` is a boolean mask or ``None`` (keep everything).
    """
    if keep is None:
        return theta0 + scaling * tau
    return theta0 + scaling * (tau * keep)


class _StraightThroughMerge(torch.autograd.Function):
    """Forward: merge with the hard mask. Backward: sigmoid surrogate of the mask.

    Written as a Function so that backward recomputes the surrogate from the scores instead of
    keeping extra full-size tensors alive between forward and backward.
    """

    @staticmethod
    def forward(ctx, scores, threshold, theta0, tau, scaling):
        keep = scores > threshold
        ctx.save_for_backward(scores, threshold, tau)
        ctx.scaling = scaling
        return masked_merge(theta0, tau, keep, scaling)

    @staticmethod
    def backward(ctx, grad_out):
        scores, threshold, tau = ctx.saved_tensors
        sig = torch.sigmoid(scores - threshold)
        grad_scores = grad_out * tau * (ctx.scaling * sig * (1 - sig))
        return grad_scores, None, None, None, None


class GlobalMask(nn.Module):
    """Learnable scores for a binary mask that removes exactly ``sparsity`` of ``τ_MT``'s entries.

    Parameters
    ----------
    multitask_vector : dict of str to torch.Tensor
        ``τ_MT``; the mask has the same keys and shapes.
    sparsity : float
        Fraction of entries (over all tensors together) the mask removes, in [0, 1).
    generator : torch.Generator, optional
        Seeds the tie-breaking jitter.

    Examples
    --------
    >>> import torch
    >>> tau = {"w": torch.tensor([0.1, -3.0, 0.5, 2.0])}
    >>> mask = GlobalMask(tau, sparsity=0.5)
    >>> mask.binary()["w"]
    tensor([False,  True, False,  True])
    """

    def __init__(self, multitask_vector: dict, sparsity: float, generator: torch.Generator | None = None):
        super().__init__()
        self.names = list(multitask_vector)
        self.shapes = [multitask_vector[k].shape for k in self.names]
        self.numels = [multitask_vector[k].numel() for k in self.names]
        n = sum(self.numels)
        self.n_remove = int(round(sparsity * n))
        ref = next(iter(multitask_vector.values()))
        scores = torch.empty(n, dtype=torch.float32, device=ref.device)
        offset = 0
        for k, numel in zip(self.names, self.numels):  # tensor by tensor: no full-size temporaries
            mag = multitask_vector[k].detach().abs().flatten().float()
            jitter = torch.rand(numel, generator=generator, dtype=torch.float32).to(scores.device)
            scores[offset : offset + numel] = torch.log(mag.clamp_min(1e-30)) + 1e-4 * jitter
            offset += numel
        self.scores = nn.Parameter(scores)
        # Large models: the training-time cut is the quantile of a fixed random sample of scores
        # (a full kthvalue would copy all P scores every step). The final mask is exact regardless.
        self._sample = None
        if n > self.exact_threshold_max and self.n_remove:
            self._sample = torch.randint(n, (self.sample_size,), generator=generator).to(scores.device)

    exact_threshold_max = 4_000_000
    sample_size = 1_000_000

    def threshold(self) -> torch.Tensor:
        """The current cut: entries with a score above it are kept."""
        if self.n_remove == 0:
            return torch.tensor(-math.inf, device=self.scores.device)
        if self._sample is None:
            return self.scores.detach().kthvalue(self.n_remove).values
        sample = self.scores.detach()[self._sample]
        k = min(max(1, round(self.n_remove / self.scores.numel() * len(sample))), len(sample))
        return sample.kthvalue(k).values

    def views(self):
        """``{name: score tensor}`` views into the flat score vector."""
        out, offset = {}, 0
        for k, shape, numel in zip(self.names, self.shapes, self.numels):
            out[k] = self.scores[offset : offset + numel].view(shape)
            offset += numel
        return out

    def merge(self, theta0: dict, tau: dict, scaling: float) -> dict[str, torch.Tensor]:
        """Differentiable ``θ_0 + λ (m ⊙ τ)`` with the hard mask (straight-through gradient)."""
        thr = self.threshold()
        views = self.views()
        return {k: _StraightThroughMerge.apply(views[k], thr, theta0[k], tau[k], scaling) for k in self.names}

    @torch.no_grad()
    def binary(self) -> dict[str, torch.Tensor]:
        """The final binary mask with exactly ``n_remove`` entries removed (ties broken by index)."""
        keep = torch.ones_like(self.scores, dtype=torch.bool)
        if self.n_remove:
            keep[torch.topk(self.scores, self.n_remove, largest=False, sorted=False).indices] = False
        out, offset = {}, 0
        for k, shape, numel in zip(self.names, self.shapes, self.numels):
            out[k] = keep[offset : offset + numel].view(shape).clone()
            offset += numel
        return out
