"""Faults and interruptions: nothing half-written, nothing mutated, only clear errors escape."""

import warnings

import numpy as np
import pytest
import torch
from conftest import fingerprint_all
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import momaestimator.merging.fit as fit_module
from momaestimator import MOMAMerger, toy


@pytest.fixture()
def fitted(problem, unlabeled):
    pre, experts, heads, _ = problem
    return MOMAMerger(pre, experts, heads, n_steps=4, sparsity=0.2, random_state=0).fit(unlabeled)


def test_non_finite_loss_stops_fit_and_leaves_estimator_unfitted(problem, unlabeled, fitted, monkeypatch):
    real = fit_module.OBJECTIVES["kl"]

    calls = [0]

    def nan_after_two_steps(student, teacher, *a):
        calls[0] += 1  # one call per task and step: 3 tasks
        loss = real[0](student, teacher, *a)
        return loss * float("nan") if calls[0] > 6 else loss

    monkeypatch.setitem(fit_module.OBJECTIVES, "kl", (nan_after_two_steps, real[1], real[2]))
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+"):
        fitted.set_params(n_steps=10, validation_fraction=0.0).fit(unlabeled)
    for attr in ("mask_", "rotations_", "history_", "n_iter_", "tasks_"):
        assert not hasattr(fitted, attr), attr


def test_keyboard_interrupt_keeps_the_best_state_so_far(problem, unlabeled, monkeypatch):
    pre, experts, heads, _ = problem
    real = fit_module.train_step

    def interrupt_at_7(ctx, batches, step):
        if step == 7:
            raise KeyboardInterrupt
        return real(ctx, batches, step)

    monkeypatch.setattr(fit_module, "train_step", interrupt_at_7)
    merger = MOMAMerger(pre, experts, heads, n_steps=50, eval_every=2, sparsity=0.2, random_state=0)
    with pytest.raises(KeyboardInterrupt, match="fit interrupted at step 6; the merger keeps the best state"):
        merger.fit(unlabeled)
    assert merger.interrupted_ and merger.n_iter_ == 6 and len(merger.history_) == 6
    assert merger.best_step_ in (0, 2, 4, 6)
    n_total = sum(m.numel() for m in merger.mask_.values())
    assert sum(int((~m).sum()) for m in merger.mask_.values()) == round(0.2 * n_total)
    merger.transform()  # fully usable


def test_keyboard_interrupt_stops_a_search_instead_of_scoring_the_cut_short_fit(problem, monkeypatch):
    from sklearn.model_selection import GridSearchCV

    from momaestimator import TaskKFold, TaskSamples, per_task_accuracy_scorer

    pre, experts, heads, data = problem
    real, calls = fit_module.train_step, []

    def interrupt_in_second_candidate(ctx, batches, step):
        calls.append(step)
        if len(calls) == 5:  # the first candidate's first fold took 3 steps
            raise KeyboardInterrupt
        return real(ctx, batches, step)

    monkeypatch.setattr(fit_module, "train_step", interrupt_in_second_candidate)
    X = TaskSamples.from_arrays({t: x for t, (x, _) in data.items()}, {t: y for t, (_, y) in data.items()})
    search = GridSearchCV(
        MOMAMerger(pre, experts, heads, n_steps=3, random_state=0),
        {"sparsity": [0.1, 0.2, 0.3]},
        cv=TaskKFold(2),
        scoring=per_task_accuracy_scorer,
        refit="mean",
    )
    with pytest.raises(KeyboardInterrupt):
        search.fit(X)
    assert len(calls) == 5 and not hasattr(search, "best_params_")


def test_keyboard_interrupt_before_any_step_propagates_and_leaves_unfitted(problem, unlabeled, monkeypatch):
    pre, experts, heads, _ = problem

    def interrupt(ctx, batches, step):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_module, "train_step", interrupt)
    merger = MOMAMerger(pre, experts, heads, n_steps=5)
    with pytest.raises(KeyboardInterrupt):
        merger.fit(unlabeled)
    assert not hasattr(merger, "mask_")


def test_failed_save_leaves_the_previous_file_intact(fitted, tmp_path, monkeypatch):
    import joblib

    path = tmp_path / "merger.joblib"
    fitted.save(path)
    before = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(joblib, "dump", crash)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["merger.joblib"]


def test_loading_a_truncated_file_names_the_file(fitted, problem, tmp_path):
    pre, experts, heads, _ = problem
    path = tmp_path / "merger.joblib"
    fitted.save(path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"merger\.joblib.*truncated"):
        MOMAMerger.load(path, pre, experts, heads)


def test_loading_with_mismatched_models_names_the_problem(fitted, tmp_path):
    path = tmp_path / "merger.joblib"
    fitted.save(path)
    pre2, experts2, heads2, _ = toy.make_problem(n_tasks=2, random_state=5)
    with pytest.raises(ValueError, match=r"fitted on tasks \['task0', 'task1', 'task2'\]"):
        MOMAMerger.load(path, pre2, experts2, heads2)
    pre3, experts3, heads3, _ = toy.make_problem(n_tasks=3, output_dim=6, random_state=5)
    with pytest.raises(ValueError, match="does not match the pretrained encoder"):
        MOMAMerger.load(path, pre3, experts3, heads3)
    pre4, experts4, heads4, _ = toy.make_problem(n_tasks=3, layers=2, random_state=5)  # one more block
    with pytest.raises(ValueError, match=r"its mask does not cover \d+ entries .*'transformer\.resblocks\.1\."):
        MOMAMerger.load(path, pre4, experts4, heads4)


def test_same_random_state_is_deterministic_across_runs(problem, unlabeled):
    pre, experts, heads, _ = problem
    runs = [MOMAMerger(pre, experts, heads, n_steps=6, sparsity=0.3, random_state=11).fit(unlabeled) for _ in "ab"]
    assert all(torch.equal(runs[0].mask_[k], runs[1].mask_[k]) for k in runs[0].mask_)
    assert all(torch.equal(runs[0].rotations_[t], runs[1].rotations_[t]) for t in runs[0].rotations_)
    assert [h["loss"] for h in runs[0].history_] == [h["loss"] for h in runs[1].history_]


# ---------------------------------------------------------------- fuzz: only clear errors come out
_TASKS = ["task0", "task1", "task2"]


def _value(kind, n, rng):
    return {
        "ok": lambda: torch.from_numpy(rng.standard_normal((max(n, 1), 3, 8, 8)).astype(np.float32)),
        "empty": lambda: torch.zeros(0, 3, 8, 8),
        "nan": lambda: torch.full((max(n, 1), 3, 8, 8), float("nan")),
        "wrong_channels": lambda: torch.zeros(max(n, 1), 1, 8, 8),
        "wrong_size": lambda: torch.zeros(max(n, 1), 3, 5, 5),
        "flat": lambda: torch.zeros(max(n, 1), 192),
        "string": lambda: "images/",
        "none": lambda: None,
        "int_list": lambda: [1, 2, 3],
        "object_array": lambda: np.array([object()] * max(n, 1)),
        "nested_dict": lambda: {"x": 1},
    }[kind]()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=st.lists(st.sampled_from([*_TASKS, "other", 0]), min_size=0, max_size=4, unique=True),
    kinds=st.lists(
        st.sampled_from(
            [
                "ok",
                "ok",
                "empty",
                "nan",
                "wrong_channels",
                "wrong_size",
                "flat",
                "string",
                "none",
                "int_list",
                "object_array",
                "nested_dict",
            ]
        ),
        min_size=4,
        max_size=4,
    ),
    n=st.integers(0, 5),
    labels=st.sampled_from(["none", "short", "ok"]),
    seed=st.integers(0, 10),
)
def test_fuzzed_inputs_raise_only_value_or_type_errors_with_a_message(problem, fitted, keys, kinds, n, labels, seed):
    pre, experts, heads, _ = problem
    before = fingerprint_all(pre, experts, heads)
    rng = np.random.default_rng(seed)
    X = {k: _value(kind, n, rng) for k, kind in zip(keys, kinds)}
    merger = MOMAMerger(pre, experts, heads, n_steps=1, random_state=0)
    for call in ("fit", "score"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if call == "fit":
                    merger.fit(X)
                else:
                    y = None
                    if labels != "none" and all(isinstance(v, torch.Tensor) for v in X.values()):
                        y = {k: np.zeros(len(v) - (labels == "short"), dtype=int) for k, v in X.items()}
                    fitted.score(X, y)
        except (ValueError, TypeError) as exc:
            assert str(exc), f"{type(exc).__name__} without a message"
    assert fingerprint_all(pre, experts, heads) == before


def _batchnorm_problem():
    """A conv encoder with BatchNorm (float running statistics in its state dict), two experts."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def block(c_in, c_out):
        return torch.nn.Sequential(torch.nn.Conv2d(c_in, c_out, 3, padding=1), torch.nn.BatchNorm2d(c_out))

    pre = torch.nn.Sequential(
        torch.nn.Sequential(block(3, 6), block(6, 6)), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()
    ).eval()
    experts = {}
    for t in ("a", "b"):
        expert = __import__("copy").deepcopy(pre)
        with torch.no_grad():
            for v in expert.state_dict().values():
                if v.is_floating_point():
                    v.add_(torch.randn(v.shape, generator=gen).mul_(0.05))
        experts[t] = expert
    heads = {t: torch.nn.Linear(6, 3) for t in experts}
    X = {t: torch.randn(20, 3, 6, 6, generator=gen) for t in experts}
    return pre, experts, heads, X


@pytest.mark.parametrize(
    ("batching", "ckpt", "remerge"),
    [
        ("sequential", False, False),
        ("joint", False, False),
        ("sequential", True, False),
        ("sequential", False, True),
        ("joint", True, True),
    ],
)
def test_an_encoder_with_batchnorm_statistics_fits(batching, ckpt, remerge):
    # the running statistics are float state-dict entries: merged and masked like the weights, but
    # batch_norm refuses a gradient for them (the fit used to fail there)
    pre, experts, heads, X = _batchnorm_problem()
    before = fingerprint_all(pre, experts, heads)
    kw = dict(n_steps=4, sparsity=0.2, validation_fraction=0.0, random_state=0, batch_size=8)
    kw.update(task_batching=batching, gradient_checkpointing=ckpt, recompute_merged_weights=remerge)
    merger = MOMAMerger(pre, experts, heads, **kw).fit(X)
    assert all(np.isfinite(h["loss"]) for h in merger.history_)
    assert "0.0.1.running_mean" in merger.mask_  # the statistics are part of the merge
    merged = merger.transform().encoder.state_dict()
    pre_state = pre.state_dict()
    for k in ("0.0.1.running_mean", "0.1.0.weight"):
        tau = sum(e.state_dict()[k] - pre_state[k] for e in experts.values())
        assert torch.allclose(merged[k], pre_state[k] + 0.3 * tau * merger.mask_[k], atol=1e-6)
    assert fingerprint_all(pre, experts, heads) == before


def test_adamerging_on_an_encoder_with_batchnorm_statistics_learns_its_coefficients():
    from momaestimator.baselines import AdaMerging

    pre, experts, heads, X = _batchnorm_problem()
    ada = AdaMerging(pre, experts, heads, n_steps=3, lr=0.05, batch_size=8, random_state=0).fit(X)
    assert not torch.allclose(ada.coefficients_, torch.full_like(ada.coefficients_, 0.3))
    assert all(np.isfinite(h["loss"]) for h in ada.history_)
