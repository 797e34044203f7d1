"""Per-task orthogonal maps ``Q_t ∈ SO(d)``, orthogonal by construction.

Each ``Q_t`` is the exponential (or Cayley transform) of a skew-symmetric matrix built from the
strict upper triangle of a free parameter, initialised at zero so that ``Q_t = I`` at the start.
No penalty is involved: every iterate is exactly a rotation up to float rounding.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["Rotations", "expm", "orthogonal_procrustes", "rotation_angles"]

# Taylor degree and Paterson-Stockmeyer block size per dtype, for arguments scaled to 1-norm <= 1/2:
# the truncation error 0.5^(m+1)/(m+1)! is below the dtype's rounding (5e-9 for m=8, 2e-17 for m=14).
_TAYLOR = {torch.float64: (14, 4)}
_FLOAT32_TAYLOR = (8, 3)


def expm(a: torch.Tensor) -> torch.Tensor:
    """Matrix exponential of (a batch of) square matrices, built from matmuls so autograd is cheap.

    A Taylor polynomial (evaluated by Paterson-Stockmeyer: 4 matmuls for float32) of ``A / 2^s``,
    then ``s`` squarings, with ``s`` chosen so the scaled 1-norm is at most 1/2. The result agrees
    with :func:`torch.linalg.matrix_exp` to the dtype's rounding; its gradient is autograd through
    those few matmuls, several times cheaper than ``matrix_exp``'s backward (the exponential of a
    ``2d × 2d`` block matrix), which dominated a fit step's rotation cost.

    Parameters
    ----------
    a : torch.Tensor of shape (..., d, d)
        Square matrices (float32 or float64).

    Returns
    -------
    torch.Tensor of shape (..., d, d)

    Examples
    --------
    >>> import torch
    >>> a = torch.tensor([[0.0, -1.0], [1.0, 0.0]])
    >>> torch.allclose(expm(a), torch.linalg.matrix_exp(a), atol=1e-6)
    True
    """
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"expm needs square matrices, got shape {tuple(a.shape)}")
    degree, block = _TAYLOR.get(a.dtype, _FLOAT32_TAYLOR)
    norm = float(a.detach().abs().sum(-2).amax()) if a.numel() else 0.0  # 1-norm, max over the batch
    if not math.isfinite(norm):
        raise FloatingPointError("expm of a matrix with non-finite entries")
    squarings = max(0, math.ceil(math.log2(norm / 0.5))) if norm > 0.5 else 0
    x = a / 2.0**squarings if squarings else a
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
    powers = [eye, x]
    for _ in range(2, block + 1):
        powers.append(powers[-1] @ x)
    coef = [1.0 / math.factorial(k) for k in range(degree + 1)]

    def chunk(j):  # sum_i coef[j*block + i] x^i, i < block
        return sum(coef[j * block + i] * powers[i] for i in range(block) if j * block + i <= degree)

    result = chunk(degree // block)
    for j in range(degree // block - 1, -1, -1):
        result = chunk(j) + powers[block] @ result
    for _ in range(squarings):
        result = result @ result
    return result


class Rotations(nn.Module):
    """One rotation per task, ``Q_t = B_t exp(A_t − A_tᵀ)`` (or Cayley) with ``A_t`` strictly upper triangular.

    ``B_t`` is the identity unless :meth:`set_base` gives a starting rotation.

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
        if n_tasks < 1 or dim < 1:
            raise ValueError(f"Rotations needs at least one task and one dimension, got n_tasks={n_tasks}, dim={dim}")
        self.method = method
        self.generators = nn.ParameterList(
            [nn.Parameter(torch.zeros(dim, dim, device=device, dtype=dtype)) for _ in range(n_tasks)]
        )
        self.register_buffer("base", None)  # fixed starting rotations B_t: Q_t = B_t map(A_t)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a state dict saved after set_base holds "base": a fresh module (base None) takes it
        key = prefix + "base"
        if self.base is None and key in state_dict:  # where and in which dtype set_base keeps it
            gen = self.generators[0]
            exact = torch.float32 if gen.device.type == "mps" else torch.float64
            self.base = torch.empty(state_dict[key].shape, device=gen.device, dtype=exact)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_base(self, base: torch.Tensor) -> None:
        """Start every ``Q_t`` at the rotation ``base[t]`` instead of the identity: ``Q_t = B_t map(A_t)``.

        Parameters
        ----------
        base : torch.Tensor of shape (n_tasks, dim, dim)
            Rotations (e.g. :func:`orthogonal_procrustes` of the start's features onto the experts').
        """
        gen = self.generators[0]
        exact = torch.float32 if gen.device.type == "mps" else torch.float64  # MPS has no float64
        self.base = base.detach().to(device=gen.device, dtype=exact)

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
        q = self._map(self.generators[index])
        return q if self.base is None else self.base[index].to(q.dtype) @ q

    def matrices(self, dtype=None, device=None) -> torch.Tensor:
        """Every ``Q_t`` at once, shape ``(n_tasks, dim, dim)`` (differentiable; one batched map).

        Parameters
        ----------
        dtype, device : optional
            Compute the map in this dtype / on this device (default: the generators'). A fit's
            result is computed in float64 on the CPU: the squarings of the exponential double the
            rounding error each, so a large float32 rotation drifts from orthogonal by ~1e-5.

        Returns
        -------
        torch.Tensor of shape (n_tasks, dim, dim)

        Examples
        --------
        >>> Rotations(3, 4).matrices().shape
        torch.Size([3, 4, 4])
        """
        q = self._map(torch.stack(list(self.generators)).to(dtype=dtype, device=device))
        return q if self.base is None else self.base.to(device=q.device, dtype=q.dtype) @ q

    def _map(self, generator: torch.Tensor) -> torch.Tensor:
        upper = generator.triu(1)
        skew = upper - upper.transpose(-1, -2)
        if self.method == "exp":
            return expm(skew)
        eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
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


def orthogonal_procrustes(
    source: torch.Tensor, target: torch.Tensor, *, proper: bool = True, normalize: bool = False
) -> torch.Tensor:
    """The orthogonal ``Q`` minimising ``‖source Qᵀ − target‖``, the identity where the data leave it free.

    With fewer samples than dimensions (few-shot features), the data fix ``Q`` only on the span
    of the samples; the textbook solution ``U Vᵀ`` is then arbitrary on the rest. Here the
    maximiser of ``tr(Qᵀ M) + ε tr(Q)`` is taken (``M = targetᵀ source``; ``ε = 1e-10 ‖M‖``, far
    below any direction the data determine, far above float64 rounding): among the data's
    minimisers, the one closest to the identity. Computed in float64 on the CPU (small: ``n × d``;
    some devices, such as MPS, have no float64).

    Parameters
    ----------
    source, target : torch.Tensor of shape (n, d)
        Paired samples (rows); ``Q`` maps ``source`` rows onto ``target`` rows.
    proper : bool, default=True
        Restrict ``Q`` to rotations (determinant +1, Kabsch's correction); else any orthogonal map.
    normalize : bool, default=False
        L2-normalise the rows first (in float64): align directions, as normalising heads see them.

    Returns
    -------
    torch.Tensor of shape (d, d), float64, on the CPU

    Examples
    --------
    >>> import torch
    >>> a = torch.randn(3, 6, dtype=torch.float64)  # 3 samples in 6 dimensions
    >>> q = orthogonal_procrustes(a, a)
    >>> bool(torch.allclose(q, torch.eye(6, dtype=torch.float64), atol=1e-5))
    True
    """
    source, target = source.detach().cpu().double(), target.detach().cpu().double()
    if normalize:
        source, target = F.normalize(source, dim=-1), F.normalize(target, dim=-1)
    m = target.T @ source
    m = m + 1e-10 * (torch.linalg.matrix_norm(m) + torch.finfo(torch.float64).tiny) * torch.eye(
        m.shape[0], dtype=m.dtype, device=m.device
    )
    u, _, vh = torch.linalg.svd(m)
    if proper and torch.linalg.det(u @ vh) < 0:
        u = torch.cat([u[:, :-1], -u[:, -1:]], dim=1)  # flip the weakest direction
    return u @ vh
