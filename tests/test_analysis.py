"""The misalignment analysis recovers planted orthogonal and non-orthogonal misalignments."""

import pytest
import torch

from momaestimator import LinearHead, MOMAMerger, toy
from momaestimator.analysis import mask_statistics, misalignment_report, rotation_statistics


def planted(transform):
    """Experts = the pretrained tower followed by ``transform`` of its output features."""
    gen = torch.Generator().manual_seed(0)
    pre = toy.make_tower(output_dim=8, random_state=0)
    experts, heads, X = {}, {}, {}
    for t in ("a", "b"):
        expert = toy.make_tower(output_dim=8, random_state=0)
        with torch.no_grad():
            expert.proj.copy_(pre.proj @ transform(t).T)
        experts[t] = expert
        heads[t] = LinearHead(torch.randn(4, 8, generator=gen))
        X[t] = torch.randn(200, 3, 8, 8, generator=gen)
    return pre, experts, heads, X


def rotation(t):
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(ord(t))))
    return q


def test_planted_rotation_is_recovered_and_called_orthogonal():
    pre, experts, heads, X = planted(rotation)
    X_fit = {t: x[:120] for t, x in X.items()}
    X_eval = {t: x[120:] for t, x in X.items()}
    rows = misalignment_report(pre, experts, heads, X_fit, scaling=1e-8, X_eval=X_eval)
    for row in rows:
        assert row["residual_identity"] > 0.3
        assert row["residual_procrustes"] < 1e-4
        assert row["linear_polar_distance"] < 0.05
        assert row["linear_singular_value_ratio"] < 1.2
        assert row["agreement_procrustes"] == 1.0
        assert row["verdict"] == "orthogonal"


def test_planted_anisotropic_scaling_is_called_not_orthogonal():
    scales = torch.logspace(-1.3, 1.3, 8)
    pre, experts, heads, X = planted(lambda t: torch.diag(scales))
    X_fit = {t: x[:120] for t, x in X.items()}
    X_eval = {t: x[120:] for t, x in X.items()}
    rows = misalignment_report(pre, experts, heads, X_fit, scaling=1e-8, X_eval=X_eval)
    for row in rows:
        assert row["residual_linear"] < 0.5 * row["residual_procrustes"]
        assert row["linear_singular_value_ratio"] > 5
        assert row["verdict"] == "not orthogonal"


def test_labels_add_accuracies_and_knn_probe(problem):
    pre, experts, heads, data = problem
    rows = misalignment_report(pre, experts, heads, data)
    assert {r["task"] for r in rows} == set(data)
    for r in rows:
        assert 0 <= r["accuracy_merged"] <= 1 and 0 <= r["knn_expert"] <= 1
        assert r["residual_procrustes"] <= r["residual_identity"] + 1e-9


def test_mask_and_rotation_statistics(problem, unlabeled):
    pre, experts, heads, _ = problem
    m = MOMAMerger(pre, experts, heads, sparsity=0.3, n_steps=10, rotation_lr=0.05, random_state=0).fit(unlabeled)
    stats = mask_statistics(m)
    assert sum(s["numel"] - s["kept"] for s in stats) == round(0.3 * sum(s["numel"] for s in stats))
    rot = rotation_statistics(m)
    assert all(r["max_angle_deg"] > 0 for r in rot)
    q = m.rotations_[rot[0]["task"]]
    assert rot[0]["frobenius_from_identity"] == pytest.approx(float((q - torch.eye(8)).norm()))


def test_a_planted_rotation_seen_on_fewer_samples_than_dimensions_generalises_on_its_span():
    """Few-shot fit data (3 samples, 8 dimensions): the map is fixed on their span only, and the
    identity elsewhere — not an arbitrary rotation that would spoil held-out residuals."""
    pre, experts, heads, X = planted(lambda t: torch.eye(8))  # nothing to align
    rows = misalignment_report(pre, experts, heads, {t: x[:3] for t, x in X.items()}, scaling=1e-8, X_eval=X)
    for row in rows:
        assert row["residual_procrustes"] < 1e-4 and row["agreement_procrustes"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_report_on_models_of_another_dtype(dtype):
    pre, experts, heads, X = planted(rotation)
    cast = {t: e.to(dtype) for t, e in experts.items()}
    rows = misalignment_report(
        pre.to(dtype), cast, {t: h.to(dtype) for t, h in heads.items()}, {t: x[:60] for t, x in X.items()}
    )
    assert len(rows) == 2 and all(r["residual_procrustes"] <= r["residual_identity"] + 1e-6 for r in rows)


def test_knn_probe_with_class_ids_that_skip_a_number():
    from momaestimator.analysis import _knn_accuracy

    z = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2] * 20)  # class 1 absent
    assert 0.0 <= _knn_accuracy(z, y, 5) <= 1.0


def test_report_parameters_are_checked(problem):
    pre, experts, heads, data = problem
    with pytest.raises(ValueError, match="n_neighbors must be in"):
        misalignment_report(pre, experts, heads, data, n_neighbors=0)
    with pytest.raises(ValueError, match="scaling must be in"):
        misalignment_report(pre, experts, heads, data, scaling=-0.3)


@pytest.mark.parametrize(("bad", "match"), [("nan", "NaN|finite"), ("width", "expects 3 input features")])
def test_misalignment_report_checks_the_heads_before_the_analysis(bad, match):
    import copy

    pre, experts, heads, data = toy.make_problem(n_tasks=2, random_state=0, finetune_steps=2)
    heads = {t: copy.deepcopy(h) for t, h in heads.items()}
    t0 = next(iter(heads))
    if bad == "nan":
        with torch.no_grad():
            next(heads[t0].parameters()).fill_(float("nan"))
    else:
        heads[t0] = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):  # was a normal-looking row / a bare matmul error
        misalignment_report(pre, experts, heads, data)


def test_plot_history_of_an_unfitted_merger_says_it_is_not_fitted():
    from sklearn.exceptions import NotFittedError

    from momaestimator.analysis import plot_history

    pre, experts, heads, _ = toy.make_problem(n_tasks=2, random_state=0, finetune_steps=2)
    with pytest.raises(NotFittedError):
        plot_history(MOMAMerger(pre, experts, heads))
