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
def test_large_vectors_cut_at_a_sampled_quantile_everywhere(monkeypatch, sparsity):
    monkeypatch.setattr(GlobalMask, "exact_threshold_max", 1000)
    monkeypatch.setattr(GlobalMask, "sample_size", 4000)
    gen = torch.Generator().manual_seed(0)
    tau = {"w": torch.randn(100, 200, generator=gen), "v": torch.randn(300, generator=gen)}
    mask = GlobalMask(tau, sparsity=sparsity, generator=gen)
    final = mask.binary()
    removed = sum(int((~m).sum()) for m in final.values()) / 20300
    assert removed == pytest.approx(sparsity, abs=0.02)  # the sample's quantile ≈ the right one
    if sparsity:
        assert removed != sparsity  # not the exact count: the sample's quantile
    thr = mask.threshold()  # what every step and evaluation use: the same mask
    assert all(torch.equal(final[k], s.detach() > thr) for k, s in zip(mask.names, mask.scores))


def test_moving_a_sampled_mask_moves_its_sample_indices(monkeypatch):
    monkeypatch.setattr(GlobalMask, "exact_threshold_max", 100)
    monkeypatch.setattr(GlobalMask, "sample_size", 50)
    mask = GlobalMask({"w": torch.randn(20, 10), "v": torch.randn(30)}, sparsity=0.2).to("meta")
    assert mask.scores[0].device.type == "meta"
    assert [idx.device.type for idx in mask._sample] == ["meta", "meta"]


def test_ties_at_the_cut_go_all_or_none_whichever_is_closer():
    tau = {"a": torch.ones(30), "b": torch.ones(20)}
    mask = GlobalMask(tau, sparsity=0.3)  # 15 of 50
    with torch.no_grad():
        mask.scores[0].fill_(0.0)  # 30 tied at the cut: none (0) and all (30) are as far from 15: none
        mask.scores[1].copy_(torch.arange(20.0) + 1)
    out = mask.binary()
    assert bool(out["a"].all()) and bool(out["b"].all())
    with torch.no_grad():
        mask.scores[0][:12] = -1.0  # 12 below, 18 tied: 12 removed is closer to 15 than 30
    out = mask.binary()
    assert int((~out["a"]).sum()) == 12 and not out["a"][:12].any() and bool(out["b"].all())
    with torch.no_grad():
        mask.scores[0][:12] = 0.0
        mask.scores[0][12:] = -1.0
        mask.scores[0][:4] = 0.5  # 18 below the tie: 18 removed, the closest count
    assert int((~mask.binary()["a"]).sum()) == 18


def test_zero_entries_of_tau_are_never_cut_and_do_not_count():
    tau = {"a": torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]), "b": torch.zeros(4)}
    mask = GlobalMask(tau, sparsity=0.5, generator=torch.Generator().manual_seed(0))
    assert mask.n_total == 4 and mask.n_remove == 2  # half of the non-zero entries
    out = mask.binary()
    assert out["a"].tolist() == [True] * 4 + [False, False, True, True] and bool(out["b"].all())
    theta0 = {k: torch.zeros_like(v) for k, v in tau.items()}
    merged = mask.merge(theta0, tau, scaling=1.0)
    merged["a"].sum().backward()
    grad = mask.scores[0].grad
    assert torch.equal(grad[:4], torch.zeros(4)) and bool(torch.isfinite(mask.scores[0].grad).all())


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


def test_the_held_out_loss_recorded_at_the_best_step_is_the_returned_models(monkeypatch, problem, unlabeled):
    """The mask scored on held-out data is the mask returned, also with the sampled cut of large
    models (forced here on the toy encoder)."""
    import numpy as np

    from momaestimator import MOMAMerger
    from momaestimator.merging.objectives import kl_to_teacher

    monkeypatch.setattr(GlobalMask, "exact_threshold_max", 1000)
    monkeypatch.setattr(GlobalMask, "sample_size", 300)  # a coarse cut
    pre, experts, heads, _ = problem
    merger = MOMAMerger(
        pre, experts, heads, n_steps=6, eval_every=1, sparsity=0.3, lr=0.5, validation_fraction=0.25, random_state=0
    ).fit(unlabeled)
    assert merger.best_step_ >= 1
    tau = merger._multitask_vector(pre.state_dict(), experts, "cpu")
    n_total = sum(int(torch.count_nonzero(v)) for v in tau.values())
    assert sum(int((~m).sum()) for m in merger.mask_.values()) / n_total == pytest.approx(0.3, abs=0.1)
    # the held-out split the fit drew (the generator is seeded from random_state, first used there)
    seed = int(np.random.RandomState(0).randint(np.iinfo(np.int32).max))
    _, x_val = merger._holdout(dict(unlabeled), torch.Generator().manual_seed(seed))
    model = merger.transform()
    with torch.no_grad():
        loss = sum(float(kl_to_teacher(model(x, t), heads[t](experts[t](x)))) for t, x in x_val.items())
    assert loss == pytest.approx(merger.history_[merger.best_step_ - 1]["valid_loss"], rel=1e-5)
