"""Tiny open_clip image towers, fine-tuned experts and heads, built in about a second.

For tests, doctests and examples: the same code paths as real CLIP ViT towers
(:class:`open_clip.transformer.VisionTransformer`), at a size that fits in a docstring. The data
is synthetic (class prototypes plus noise) — never use it to judge a method; the embedded
benchmark (:mod:`momaestimator.bench`) uses real images.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from open_clip.transformer import VisionTransformer
from sklearn.utils import check_random_state
from torch import nn

from .models import LinearHead

__all__ = ["count_parameters", "make_problem", "make_tower"]


def make_tower(*, image_size=8, patch_size=4, width=16, layers=1, heads=2, output_dim=8, random_state=0):
    """A tiny open_clip ``VisionTransformer`` image tower with seeded random weights.

    Parameters
    ----------
    image_size : int, default=8
        Input images are ``(3, image_size, image_size)``.
    patch_size : int, default=4
        Side of the square patches.
    width : int, default=16
        Transformer width.
    layers : int, default=1
        Number of residual attention blocks.
    heads : int, default=2
        Attention heads.
    output_dim : int, default=8
        Feature dimension of the output.
    random_state : int, default=0
        Seed of the weights (the global torch RNG is left untouched).

    Returns
    -------
    open_clip.transformer.VisionTransformer
        In eval mode.

    Examples
    --------
    >>> import torch
    >>> make_tower()(torch.zeros(2, 3, 8, 8)).shape
    torch.Size([2, 8])
    """
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: CUDA generators are left alone
        torch.random.default_generator.manual_seed(random_state)
        return VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            layers=layers,
            heads=heads,
            mlp_ratio=2.0,
            output_dim=output_dim,
        ).eval()


def count_parameters(encoder: nn.Module, heads) -> int:
    """Parameters of one encoder plus the heads (what a zero-overhead merge must return).

    Parameters
    ----------
    encoder : torch.nn.Module
        One encoder.
    heads : dict of str to torch.nn.Module, or list
        The heads.

    Returns
    -------
    int

    Examples
    --------
    >>> count_parameters(torch.nn.Linear(2, 2), {"a": torch.nn.Linear(2, 1)})
    9
    """
    heads = heads.values() if isinstance(heads, dict) else heads
    return sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for h in heads for p in h.parameters())


def _task_data(n_classes, n_samples, image_size, noise, generator):
    protos = torch.randn(n_classes, 3, image_size, image_size, generator=generator)
    y = torch.arange(n_samples) % n_classes
    x = protos[y] + noise * torch.randn(n_samples, 3, image_size, image_size, generator=generator)
    return x, y


def make_problem(
    n_tasks=3,
    *,
    n_classes=3,
    n_samples=24,
    image_size=8,
    output_dim=8,
    layers=1,
    finetune_steps=15,
    noise=0.8,
    normalize=True,
    random_state=0,
):
    """A pretrained tower, one fine-tuned expert and one frozen head per task, and labelled data.

    Each expert is the pretrained tower fine-tuned (Adam, a few full steps) with its frozen head on
    its task's synthetic data, so experts genuinely disagree with the pretrained tower.

    Parameters
    ----------
    n_tasks : int, default=3
    n_classes : int, default=3
    n_samples : int, default=24
        Samples per task.
    image_size : int, default=8
    output_dim : int, default=8
        Feature dimension.
    layers : int, default=1
        Transformer blocks of the tower.
    finetune_steps : int, default=15
    noise : float, default=0.8
        Standard deviation of the pixel noise around each class prototype (higher: harder tasks).
    normalize : bool, default=True
        Whether heads L2-normalise features (CLIP-style) or are plain linear maps.
    random_state : int or None, default=0
        Seed of everything; ``None`` draws one from NumPy's global generator.

    Returns
    -------
    pretrained : VisionTransformer
    finetuned : dict of str to VisionTransformer
    heads : dict of str to LinearHead
    X : dict of str to tuple of (torch.Tensor, torch.Tensor)
        ``{task: (images, labels)}``; ``fit`` ignores the labels.

    Examples
    --------
    >>> pre, experts, heads, X = make_problem(n_tasks=2)
    >>> sorted(experts), X["task0"][0].shape
    (['task0', 'task1'], torch.Size([24, 3, 8, 8]))
    """
    if n_samples < n_classes:
        raise ValueError(
            f"n_samples={n_samples} < n_classes={n_classes}: every class needs a sample (its head row is a class mean)"
        )
    if random_state is None:
        random_state = int(check_random_state(None).randint(np.iinfo(np.int32).max))  # as scikit-learn draws
    gen = torch.Generator().manual_seed(random_state)
    pre = make_tower(image_size=image_size, output_dim=output_dim, layers=layers, random_state=random_state)
    experts, heads, data = {}, {}, {}
    for t in range(n_tasks):
        name = f"task{t}"
        x, y = _task_data(n_classes, n_samples, image_size, noise, gen)
        with torch.no_grad():
            feats = pre(x)
            if normalize:
                feats = feats / feats.norm(dim=-1, keepdim=True)
            means = torch.stack([feats[y == c].mean(0) for c in range(n_classes)])
        weight = 10 * means / means.norm(dim=-1, keepdim=True) if normalize else means
        heads[name] = LinearHead(weight, normalize=normalize)
        expert = copy.deepcopy(pre).train()
        opt = torch.optim.Adam(expert.parameters(), lr=1e-2)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(random_state + t)
            for _ in range(finetune_steps):
                loss = nn.functional.cross_entropy(nn.functional.linear(_maybe_norm(expert(x), normalize), weight), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        experts[name] = expert.eval().requires_grad_(True)
        data[name] = (x, y)
    return pre, experts, heads, data


def _maybe_norm(z, normalize):
    return z / z.norm(dim=-1, keepdim=True) if normalize else z
