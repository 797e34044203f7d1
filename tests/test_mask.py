"""The global mask: starts at magnitude pruning, exact final sparsity, straight-through gradients."""

import pytest
import torch

from momaestimator.merging import GlobalMask


def test_initial_mask_removes_smallest_magnitudes():
    tau = {"a": torch.tensor([0.5, -0.01, 2.0]), "b": torch.tensor([[0.02, -3.0]])}
    mask = GlobalMask(tau, sparsity=0.4, generator=torch.Generator().manual_seed(0)).binary()
    assert mask["a"].tolist() == [True, False, True] and mask["b"].tolist() == [[False, True]]


def test_forward_is_hard_mask_and_gradient_reaches_scores_near_the_cut():
    tau = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    theta0 = {"w": torch.zeros(4)}
    mask = GlobalMask(tau, sparsity=0.5, generator=torch.Generator().manual_seed(0))
    merged = mask.merge(theta0, tau, scaling=0.5)["w"]
    assert torch.equal(merged, torch.tensor([0.0, 0.0, 1.5, 2.0]))
    merged.sum().backward()
    grad = mask.scores[0].grad
    assert grad is not None and (grad > 0).all()  # every entry would raise the sum if kept more


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.9])
def test_sampled_threshold_for_large_vectors_keeps_exact_final_count(monkeypatch, sparsity):
    monkeypatch.setattr(GlobalMask, "exact_threshold_max", 1000)
    monkeypatch.setattr(GlobalMask, "sample_size", 4000)
    gen = torch.Generator().manual_seed(0)
    tau = {"w": torch.randn(100, 200, generator=gen)}
    mask = GlobalMask(tau, sparsity=sparsity, generator=gen)
    removed_now = float((mask.scores[0] <= mask.threshold()).float().mean()) if sparsity else 0.0
    assert removed_now == pytest.approx(sparsity, abs=0.03)  # sampled cut ≈ the right quantile
    final = mask.binary()["w"]
    assert int((~final).sum()) == round(sparsity * 20000)


def test_exact_count_with_tied_scores_breaks_ties_by_position(monkeypatch):
    monkeypatch.setattr(GlobalMask, "exact_threshold_max", 10)
    monkeypatch.setattr(GlobalMask, "sample_size", 50)
    tau = {"a": torch.ones(30), "b": torch.ones(20)}
    mask = GlobalMask(tau, sparsity=0.3)
    with torch.no_grad():
        for s in mask.scores:
            s.fill_(0.0)  # every score tied
    out = mask.binary()
    assert int((~out["a"]).sum()) == 15 and bool(out["b"].all())  # the first 15 positions go
    assert not out["a"][:15].any()


def test_merge_into_writes_the_same_bits_as_masked_merge():
    import torch

    from momaestimator.merging import GlobalMask, masked_merge

    gen = torch.Generator().manual_seed(0)
    theta0 = {"a": torch.randn(5, 7, generator=gen), "b": torch.randn(11, generator=gen)}
    tau = {k: 0.01 * torch.randn(v.shape, generator=gen) for k, v in theta0.items()}
    mask = GlobalMask(tau, sparsity=0.3, generator=gen)
    out = {k: torch.empty_like(v) for k, v in theta0.items()}
    thr = mask.threshold()
    mask.merge_into(out, theta0, tau, 0.37, thr)
    for k, s in zip(mask.names, mask.scores):
        assert torch.equal(out[k], masked_merge(theta0[k], tau[k], s > thr, 0.37))
