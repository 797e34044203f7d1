"""Modules the library returns: classification heads and the absorbed merged model."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .data import task_keyed

__all__ = ["LinearHead", "MergedModel"]


class LinearHead(nn.Module):
    """A linear classification head, optionally applied to L2-normalised features.

    This is the head CLIP's zero-shot classifiers and the task_vectors release use:
    ``logits = W · z / ‖z‖ + b`` when ``normalize`` is true, ``W · z + b`` otherwise.

    Parameters
    ----------
    weight : torch.Tensor of shape (n_classes, n_features)
        Class weights (a logit scale, if any, is folded in).
    bias : torch.Tensor of shape (n_classes,) or None, default=None
        Class biases; ``None`` means zeros.
    normalize : bool, default=True
        Whether the input features are L2-normalised before the linear map.

    Examples
    --------
    >>> import torch
    >>> from momaestimator import LinearHead
    >>> head = LinearHead(torch.eye(2), normalize=True)
    >>> head(torch.tensor([[3.0, 4.0]])).detach()
    tensor([[0.6000, 0.8000]])
    """

    def __init__(self, weight, bias=None, normalize=True):
        super().__init__()
        weight = torch.as_tensor(weight).detach().clone()
        if weight.ndim != 2:
            raise ValueError(f"weight must be 2-D (n_classes, n_features), got shape {tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        if not isinstance(normalize, (bool, np.bool_)):
            raise TypeError(f"normalize must be a bool, got {normalize!r}")
        if bias is None:
            bias = torch.zeros(weight.shape[0], dtype=weight.dtype)
        bias = torch.as_tensor(bias, dtype=weight.dtype).detach().clone()
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.normalize = bool(normalize)

    @property
    def in_features(self) -> int:
        """Number of input features ``n_features`` (columns of ``weight``)."""
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        """Number of classes ``n_classes`` (rows of ``weight``)."""
        return self.weight.shape[0]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of features.

        Parameters
        ----------
        features : torch.Tensor of shape (batch, n_features)
            Encoder outputs; L2-normalised here first when ``normalize`` is true.

        Returns
        -------
        torch.Tensor of shape (batch, n_classes)
        """
        if self.normalize:
            features = features / features.norm(dim=-1, keepdim=True)
        return nn.functional.linear(features, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, normalize={self.normalize}"


class MergedModel(nn.Module):
    """One merged encoder serving every task through that task's head.

    Returned by :meth:`momaestimator.MOMAMerger.transform`. It holds exactly the
    parameters of "one encoder + the original heads": MOMA's mask and rotations
    are absorbed into these weights.

    Parameters
    ----------
    encoder : torch.nn.Module
        The merged encoder (an instance of the user's encoder class).
    heads : dict of str to torch.nn.Module
        One head per task. Wrapped, not copied (as ``nn.Sequential`` does): loading a state dict
        into the model writes into these modules, so pass copies of heads you still need as they are.

    Examples
    --------
    >>> import torch
    >>> from momaestimator import LinearHead, MergedModel
    >>> model = MergedModel(torch.nn.Identity(), {"a": LinearHead(torch.eye(2), normalize=False)})
    >>> model(torch.ones(1, 2), "a").detach()
    tensor([[1., 1.]])
    """

    def __init__(self, encoder: nn.Module, heads):
        super().__init__()
        self.encoder = encoder
        pairs = heads if isinstance(heads, Mapping) else dict(heads)  # a dict, a ModuleDict or (name, head) pairs
        self.heads = nn.ModuleDict(task_keyed(pairs, "heads"))  # model(x, 0) serves the task "0"

    @property
    def tasks(self) -> list[str]:
        """The task names this model serves, in order."""
        return list(self.heads.keys())

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Logits of ``task``'s head on the merged encoder's features of ``x``.

        Parameters
        ----------
        x : torch.Tensor
            A batch of encoder inputs (e.g. images).
        task : str
            Which head to apply; one of :attr:`tasks`. Task names are strings: a task given as
            ``0`` when fitting is served as ``"0"``, and ``model(x, 0)`` finds it too.

        Returns
        -------
        torch.Tensor of shape (batch, n_classes of ``task``)
        """
        if not isinstance(task, str):
            task = str(task)
        if task not in self.heads:
            raise KeyError(f"unknown task {task!r}; this model serves {self.tasks}")
        return self.heads[task](self.encoder(x))
