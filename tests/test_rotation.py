"""The rotation map (matmul-only matrix exponential) and the scores' optimizer."""

import pytest
import torch

from momaestimator.merging.fit import ScoreAdam
from momaestimator.merging.mask import score_gradient
from momaestimator.merging.rotation import Rotations, expm


def _skew(n, d, scale, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, d, generator=g, dtype=dtype) * scale / d**0.5
    return a - a.transpose(-1, -2)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("scale", [0.0, 1e-3, 0.3, 3.0, 60.0])  # 60: several squarings
def test_expm_matches_torch_matrix_exp_in_value_and_gradient(dtype, tol, scale):
    a = _skew(3, 24, scale, dtype)
    exact = torch.linalg.matrix_exp(a.double())
    got = expm(a)
    torch_error = float((torch.linalg.matrix_exp(a).double() - exact).abs().max())
    assert float((got.double() - exact).abs().max()) <= max(tol, 3 * torch_error)  # as accurate as torch
    eye = torch.eye(24, dtype=dtype)
    assert (got @ got.transpose(-1, -2) - eye).abs().max() <= 10 * tol  # a rotation
    weights = torch.randn(a.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    grads = []
    for f in (expm, torch.linalg.matrix_exp):
        leaf = a.clone().requires_grad_()
        (f(leaf) * weights).sum().backward()
        grads.append(leaf.grad)
    assert (grads[0] - grads[1]).abs().max() <= 10 * tol * float(grads[1].abs().max())


def test_expm_of_general_matrices_and_bad_shapes():
    a = torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2
    assert torch.allclose(expm(a), torch.linalg.matrix_exp(a), rtol=1e-11, atol=1e-11)
    with pytest.raises(ValueError, match="square"):
        expm(torch.zeros(3, 4))
    with pytest.raises(FloatingPointError, match="non-finite"):
        expm(torch.full((2, 2), float("nan")))


@pytest.mark.parametrize("method", ["exp", "cayley"])
def test_matrices_is_every_matrix_at_once(method):
    rot = Rotations(3, 6, method=method, dtype=torch.float64)
    with torch.no_grad():
        for i, g in enumerate(rot.generators):
            g.copy_(_skew(1, 6, 0.5 * (i + 1), torch.float64, seed=i)[0])
    batched = rot.matrices()
    for i in range(3):
        assert torch.allclose(batched[i], rot.matrix(i), atol=1e-13)
        q = rot.matrix(i)
        assert torch.allclose(q @ q.T, torch.eye(6, dtype=torch.float64), atol=1e-12)
        assert not torch.allclose(q, torch.eye(6, dtype=torch.float64))


def test_score_adam_takes_torch_adams_steps_per_tensor_or_all_at_once():
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (7,), (2, 2, 2)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(4)]
    ref = [torch.nn.Parameter(t.clone()) for t in start]
    opt = torch.optim.Adam(ref, lr=0.05)
    one = [torch.nn.Parameter(t.clone()) for t in start]
    all_ = [torch.nn.Parameter(t.clone()) for t in start]
    by_one, at_once = ScoreAdam(one, lr=0.05), ScoreAdam(all_, lr=0.05)
    for g in grads:
        for p, gi in zip(ref, g):
            p.grad = gi.clone()
        opt.step()
        for i, gi in enumerate(g):
            by_one.step([i], [gi])
        at_once.step([0, 1, 2], g)
    for r, a, b, s in zip(ref, one, all_, start):
        assert torch.allclose(a, r, rtol=1e-6, atol=1e-7)
        assert torch.equal(a, b)
        assert (a - s).abs().min() > 1e-3  # every entry moved


def test_score_gradient_in_place_equals_the_new_tensor_form():
    gen = torch.Generator().manual_seed(4)
    grad, scores, tau = (torch.randn(50, generator=gen) for _ in range(3))
    expected = score_gradient(grad, scores, torch.tensor(0.1), tau, 0.3)
    buf = grad.clone()
    out = score_gradient(buf, scores, torch.tensor(0.1), tau, 0.3, out=buf)
    assert out.data_ptr() == buf.data_ptr()
    assert torch.allclose(buf, expected, rtol=1e-6, atol=1e-8)
    assert (expected != 0).all()


def test_score_gradient_with_a_scratch_buffer_gives_the_same_bits():
    gen = torch.Generator().manual_seed(5)
    grad, scores, tau = (torch.randn(6, 7, generator=gen) for _ in range(3))
    expected = score_gradient(grad, scores, torch.tensor(0.1), tau, 0.3)
    scratch = torch.full((100,), float("nan"))  # larger than the tensor; leftovers must not leak in
    buf = grad.clone()
    out = score_gradient(buf, scores, torch.tensor(0.1), tau, 0.3, out=buf, buffer=scratch)
    assert torch.equal(out, expected)
    assert torch.equal(scratch[:42].view(6, 7), torch.sigmoid(scores - 0.1))  # the sigmoid went there
    assert scratch[42:].isnan().all()


def test_a_long_float32_fit_returns_rotations_orthogonal_to_float32_rounding():
    """The exponential's squarings double float32 rounding each: the result is computed in float64."""
    import copy

    from torch import nn

    from momaestimator import LinearHead, MOMAMerger

    torch.manual_seed(0)
    d = 96
    pre = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, d))
    experts = {}
    for t in ("a", "b"):
        experts[t] = copy.deepcopy(pre)
        with torch.no_grad():
            for p in experts[t].parameters():
                p.add_(0.3 * torch.randn_like(p))
    heads = {t: LinearHead(torch.randn(5, d) * 10, torch.randn(5), normalize=True) for t in experts}
    X = {t: torch.randn(40, 16) for t in experts}
    merger = MOMAMerger(
        pre, experts, heads, n_steps=60, rotation_lr=0.05, sparsity=0.2, validation_fraction=0, random_state=0
    ).fit(X)
    for q in merger.rotations_.values():
        assert q.dtype == torch.float32
        q64 = q.double()
        assert float(torch.linalg.eigvals(q64).angle().abs().max()) > 1.0  # a large rotation: several squarings
        assert float((q64.T @ q64 - torch.eye(d, dtype=torch.float64)).abs().max()) < 5e-7


def test_a_procrustes_start_is_the_closed_form_rotation_and_the_fit_learns_on_from_it(problem, unlabeled):
    """``rotation_init="procrustes"``: with no step, the rotations are the closed-form Procrustes
    rotations of the start's features onto the experts' (what ProcrustesAlignment computes on the
    same merge); with steps, Q_t = B_t exp(S_t) moves on from there and stays a rotation."""
    from momaestimator import MOMAMerger
    from momaestimator.baselines import ProcrustesAlignment

    pre, experts, heads, _ = problem
    fit = {"learn_mask": False, "validation_fraction": 0.0, "random_state": 0}
    start = MOMAMerger(pre, experts, heads, n_steps=0, rotation_init="procrustes", **fit).fit(unlabeled)
    closed = ProcrustesAlignment(pre, experts, heads).fit(unlabeled)
    for t in start.tasks_:
        torch.testing.assert_close(start.rotations_[t], closed.rotations_[t], atol=1e-5, rtol=0)
        assert float((start.rotations_[t] - torch.eye(8)).norm()) > 0.1  # not the identity
    learned = MOMAMerger(pre, experts, heads, n_steps=5, rotation_init="procrustes", rotation_lr=0.05, **fit).fit(
        unlabeled
    )
    for t, q in learned.rotations_.items():
        assert not torch.allclose(q, start.rotations_[t], atol=1e-4)
        q64 = q.double()
        assert torch.allclose(q64.T @ q64, torch.eye(8, dtype=torch.float64), atol=1e-6)
        assert float(torch.linalg.det(q64)) == pytest.approx(1.0, abs=1e-6)


def test_rotation_init_is_checked(problem, unlabeled):
    from momaestimator import MOMAMerger

    with pytest.raises(ValueError, match="unknown rotation_init 'svd'"):
        MOMAMerger(*problem[:3], rotation_init="svd").fit(unlabeled)
