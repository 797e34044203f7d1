"""Per-task orthogonal maps ``Q_t ∈ SO(d)``, orthogonal by construction.

Each ``Q_t`` is the exponential (or Cayley transform) of a skew-symmetric matrix built from the
strict upper triangle of a free parameter, initialised at zero so that ``Q_t = I`` at the start.
No penalty is involved: every iterate is exactly a rotation up to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Rotations", "rotation_angles"]


class Rotations(nn.Module):
    """One rotation per task, ``Q_t = exp(A_t − A_tᵀ)`` (or Cayley) with ``A_t`` strictly upper triangular.

    Parameters
    ----------
    n_tasks : int
        Number of rotations.
    dim : int
        Feature dimension ``d``.
    method : {"exp", "cayley"}, default="exp"
        The map from skew-symmetric matrices to rotations.
    device : str or torch.device, optional
        Where the generators live.
    dtype : torch.dtype, default=torch.float32
        dtype of the generators (and of the rotations).

    Examples
    --------
    >>> import torch
    >>> rot = Rotations(2, 3)
    >>> torch.equal(rot.matrix(0), torch.eye(3))
    True
    """

    def __init__(self, n_tasks: int, dim: int, method: str = "exp", device=None, dtype=torch.float32):
        super().__init__()
        if method not in ("exp", "cayley"):
            raise ValueError(f"unknown rotation method {method!r}; expected 'exp' or 'cayley'")
        self.method = method
        self.generators = nn.ParameterList(
            [nn.Parameter(torch.zeros(dim, dim, device=device, dtype=dtype)) for _ in range(n_tasks)]
        )

    def matrix(self, index: int) -> torch.Tensor:
        """``Q`` of task number ``index`` (differentiable).

        Parameters
        ----------
        index : int
            Task number, in ``[0, n_tasks)``.

        Returns
        -------
        torch.Tensor of shape (dim, dim)
        """
        upper = self.generators[index].triu(1)
        skew = upper - upper.T
        if self.method == "exp":
            return torch.linalg.matrix_exp(skew)
        eye = torch.eye(skew.shape[0], dtype=skew.dtype, device=skew.device)
        return torch.linalg.solve(eye - skew, eye + skew)


def rotation_angles(q: torch.Tensor) -> torch.Tensor:
    """Principal rotation angles (radians) of an orthogonal matrix, from its eigenvalues.

    Parameters
    ----------
    q : torch.Tensor of shape (d, d)
        An orthogonal matrix.

    Returns
    -------
    torch.Tensor of shape (d,)
        Absolute eigenvalue angles, largest first (each plane's angle appears twice).

    Examples
    --------
    >>> import math, torch
    >>> c, s = math.cos(0.3), math.sin(0.3)
    >>> rotation_angles(torch.tensor([[c, -s], [s, c]])).max().item() > 0.29
    True
    """
    eig = torch.linalg.eigvals(q.double())
    return torch.angle(eig).abs().sort(descending=True).values.float()
