"""Every comparison method: fit → transform → score, its extra parameters, and what it must equal."""

import pytest
import torch
from conftest import fingerprint_all

from momaestimator import MOMAMerger
from momaestimator.baselines import (
    AdaMerging,
    HeadFineTuning,
    IndividualExperts,
    PretrainedHeads,
    ProcrustesAlignment,
    RepresentationSurgery,
    TaskArithmetic,
    TiesMerging,
    WeightAveraging,
)
from momaestimator.merging import task_arithmetic
from momaestimator.merging.rotation import orthogonal_procrustes

METHODS = {
    "pretrained": lambda m: PretrainedHeads(*m),
    "individual": lambda m: IndividualExperts(*m),
    "weight_averaging": lambda m: WeightAveraging(*m),
    "task_arithmetic": lambda m: TaskArithmetic(*m, scaling=0.3),
    "ties": lambda m: TiesMerging(*m),
    "adamerging_taskwise": lambda m: AdaMerging(*m, granularity="task", n_steps=5, random_state=0),
    "adamerging_layerwise": lambda m: AdaMerging(*m, granularity="layer", n_steps=5, random_state=0),
    "surgery": lambda m: RepresentationSurgery(*m, rank=4, n_steps=5, random_state=0),
    "ft_classifier": lambda m: HeadFineTuning(*m, n_steps=5, random_state=0),
    "procrustes": lambda m: ProcrustesAlignment(*m),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_fit_transform_score_and_user_modules_untouched(problem, unlabeled, name):
    pre, experts, heads, data = problem
    before = fingerprint_all(pre, experts, heads)
    est = METHODS[name]((pre, experts, heads)).fit(unlabeled)
    model = est.transform()
    per_task = est.score_per_task(data)
    assert set(per_task) == set(data)
    for t, (x, y) in data.items():
        with torch.no_grad():
            acc = float((model(x, t).argmax(-1) == y).float().mean())
        assert per_task[t] == pytest.approx(acc)
    assert est.score(data) == pytest.approx(sum(per_task.values()) / len(per_task))
    assert fingerprint_all(pre, experts, heads) == before
    n_enc = sum(p.numel() for p in pre.parameters())
    n_heads = sum(p.numel() for h in heads.values() for p in h.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_enc + n_heads + est.extra_params_


def test_extra_parameters_are_counted(problem):
    pre, experts, heads, _ = problem
    n_enc = sum(p.numel() for p in pre.parameters())
    assert IndividualExperts(pre, experts, heads).fit().extra_params_ == 2 * n_enc
    X = {t: x for t, (x, _) in problem[3].items()}
    surgery = RepresentationSurgery(pre, experts, heads, rank=4, n_steps=1, random_state=0).fit(X)
    assert surgery.extra_params_ == 3 * 2 * 8 * 4  # tasks × (down + up) × d × rank


def test_individual_reproduces_each_expert(problem):
    pre, experts, heads, data = problem
    model = IndividualExperts(pre, experts, heads).fit().transform()
    x = data["task1"][0]
    with torch.no_grad():
        assert torch.equal(model(x, "task1"), heads["task1"](experts["task1"](x)))


def test_task_arithmetic_baseline_equals_moma_without_learning(problem, unlabeled):
    pre, experts, heads, _ = problem
    ta = TaskArithmetic(pre, experts, heads, scaling=0.4).fit().transform()
    moma = MOMAMerger(pre, experts, heads, scaling=0.4, sparsity=0.0, n_steps=0).fit(unlabeled).transform()
    ref = task_arithmetic(pre, experts, scaling=0.4)
    for k, v in ta.encoder.state_dict().items():
        assert torch.allclose(v, ref[k]) and torch.allclose(moma.encoder.state_dict()[k], v, atol=1e-7)


def test_adamerging_taskwise_starts_at_task_arithmetic_and_stays_in_range(problem, unlabeled):
    pre, experts, heads, _ = problem
    ada0 = AdaMerging(pre, experts, heads, granularity="task", init_scaling=0.3, n_steps=0).fit(unlabeled)
    ta = TaskArithmetic(pre, experts, heads, scaling=0.3).fit().transform()
    for k, v in ada0.transform().encoder.state_dict().items():
        assert torch.allclose(v, ta.encoder.state_dict()[k], atol=1e-6)
    ada = AdaMerging(pre, experts, heads, granularity="layer", n_steps=20, lr=0.05, random_state=0).fit(unlabeled)
    assert ada.coefficients_.min() >= 0 and ada.coefficients_.max() <= 1
    assert not torch.allclose(ada.coefficients_, torch.full_like(ada.coefficients_, 0.3))
    assert ada.history_[-1]["loss"] < ada.history_[0]["loss"]  # entropy decreases


def test_procrustes_recovers_a_planted_rotation():
    from momaestimator import LinearHead, toy

    pre = toy.make_tower(random_state=0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    if torch.linalg.det(q) < 0:  # a rotation: the baseline returns rotations, as MOMA
        q[:, 0] = -q[:, 0]
    rotated = toy.make_tower(random_state=0)
    with torch.no_grad():
        rotated.proj.copy_(pre.proj @ q.T)  # expert features = Q · pretrained features
    heads = {"a": LinearHead(torch.randn(3, 8))}
    X = {"a": torch.randn(64, 3, 8, 8)}
    est = ProcrustesAlignment(pre, {"a": rotated}, heads, scaling=1e-9).fit(X)  # merged ≈ pretrained
    assert torch.allclose(est.rotations_["a"], q, atol=1e-4)


def test_procrustes_with_fewer_samples_than_dimensions_is_the_identity_where_the_data_say_nothing():
    from momaestimator import LinearHead, toy

    pre = toy.make_tower(random_state=0)
    heads = {"a": LinearHead(torch.randn(3, 8))}
    X = {"a": torch.randn(3, 3, 8, 8)}  # 3 samples, 8 feature dimensions
    est = ProcrustesAlignment(pre, {"a": pre}, heads, scaling=1e-9).fit(X)  # merged = expert: nothing to align
    assert torch.allclose(est.rotations_["a"], torch.eye(8), atol=1e-4)
    # a planted rotation is recovered on the samples' span, and the map is a rotation
    q = orthogonal_procrustes(torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64))
    assert float(torch.linalg.det(q)) == pytest.approx(1.0)


def test_orthogonal_procrustes_recovers_the_map_on_the_data_span():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=torch.float64))
    a = torch.randn(2, 6, generator=gen, dtype=torch.float64)
    est = orthogonal_procrustes(a, a @ q.T, proper=False)
    torch.testing.assert_close(a @ est.T, a @ q.T)  # exact on the 2 samples
    assert torch.allclose(est.T @ est, torch.eye(6, dtype=torch.float64))
    spans = torch.cat([a, a @ q.T]).T  # the samples and their images: 4 of 6 dimensions
    x = torch.randn(6, generator=gen, dtype=torch.float64)
    x -= spans @ torch.linalg.lstsq(spans, x).solution
    torch.testing.assert_close(est @ x, x, atol=1e-5, rtol=0)  # the identity where the data say nothing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", [MOMAMerger, AdaMerging, RepresentationSurgery, HeadFineTuning])
def test_learned_methods_fit_models_held_in_half_precision(problem, cls, dtype):
    import copy

    pre, experts, heads, data = problem
    pre_h = copy.deepcopy(pre).to(dtype)
    experts_h = {t: copy.deepcopy(m).to(dtype) for t, m in experts.items()}
    heads_h = {t: copy.deepcopy(h).to(dtype) for t, h in heads.items()}
    before = fingerprint_all(pre_h, experts_h, heads_h)
    est = cls(pre_h, experts_h, heads_h, n_steps=4, random_state=0).fit({t: x.to(dtype) for t, (x, _) in data.items()})
    assert fingerprint_all(pre_h, experts_h, heads_h) == before
    model = est.transform()
    assert all(p.dtype == dtype for p in model.encoder.parameters())  # the user's precision is kept
    # every method reaches 1.0 on this toy in float32; a dtype bug shows as chance (1/3) or an error
    assert est.score({t: (x.to(dtype), y) for t, (x, y) in data.items()}) > 0.9


# ---------------------------------------------------------------- contracts shared with MOMAMerger
def test_surgery_returns_a_model_of_its_own(problem, unlabeled):
    pre, experts, heads, data = problem
    est = RepresentationSurgery(pre, experts, heads, rank=4, n_steps=3, random_state=0).fit(unlabeled)
    before = est.score(data)
    model = est.transform()
    with torch.no_grad():
        for p in model.adapters.parameters():
            p.mul_(100.0)  # the returned model is the user's to change
    assert est.score(data) == before


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: RepresentationSurgery(*m, scaling=-1.0), r"scaling must be in \(0.0, inf\]"),
        (lambda m: HeadFineTuning(*m, scaling=float("nan")), "scaling must be finite"),
        (lambda m: ProcrustesAlignment(*m, scaling="x"), "scaling must be a number"),
        (lambda m: ProcrustesAlignment(*m, base="dare"), "unknown base 'dare'"),
        (lambda m: AdaMerging(*m, init_scaling=5.0), r"init_scaling .* must be in \[0.0, 1.0\]"),
    ],
)
def test_bad_settings_are_refused_before_any_work(problem, unlabeled, make, match, monkeypatch):
    from momaestimator.baselines import base

    pre, experts, heads, _ = problem
    monkeypatch.setattr(base, "teacher_targets", lambda *a, **k: pytest.fail("an expert was run"))
    with pytest.raises((TypeError, ValueError), match=match):
        make((pre, experts, heads)).fit(unlabeled)


def test_baselines_check_heads_as_the_merger_does(problem, unlabeled):
    from momaestimator import LinearHead

    pre, experts, heads, _ = problem

    class Centred(torch.nn.Linear):
        def forward(self, z):
            return super().forward(z - z.mean(-1, keepdim=True))

    centred = {t: Centred(8, 3) for t in heads}
    with pytest.raises(ValueError, match=r"heads\['task0'\] \(Centred\) cannot absorb a rotation"):
        ProcrustesAlignment(pre, experts, centred).fit(unlabeled)
    TaskArithmetic(pre, experts, centred).fit()  # no rotation to absorb: any head is fine
    narrow = {t: LinearHead(torch.randn(3, 5)) for t in heads}
    with pytest.raises(ValueError, match=r"heads\['task0'\] expects 5 input features but the encoder outputs 8"):
        AdaMerging(pre, experts, narrow, n_steps=1).fit(unlabeled)


def test_individual_experts_transform_before_fit_is_not_fitted(problem):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        IndividualExperts(*problem[:3]).transform()


@pytest.mark.parametrize("name", ["individual", "surgery"])
def test_models_of_int_keyed_tasks_serve_int_keys(problem, unlabeled, name):
    pre, experts, heads, _ = problem
    keyed = dict(enumerate(experts))
    models = (pre, {i: experts[t] for i, t in keyed.items()}, {i: heads[t] for i, t in keyed.items()})
    model = METHODS[name](models).fit({i: unlabeled[t] for i, t in keyed.items()}).transform()
    x = unlabeled["task1"][:3]
    with torch.no_grad():
        assert torch.equal(model(x, 1), model(x, "1"))


@pytest.mark.parametrize(
    "cls",
    [
        TaskArithmetic,
        TiesMerging,
        WeightAveraging,
        PretrainedHeads,
        IndividualExperts,
        AdaMerging,
        RepresentationSurgery,
        HeadFineTuning,
        ProcrustesAlignment,
    ],
)
def test_a_failed_refit_leaves_a_baseline_unfitted(problem, unlabeled, cls):
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    pre, experts, heads, data = problem
    kw = {"n_steps": 2} if "n_steps" in cls().get_params() else {}
    merger = cls(pre, experts, heads, **kw).fit(unlabeled)
    check_is_fitted(merger)
    merger.set_params(heads=None)  # the refit fails while checking the models
    with pytest.raises(TypeError):
        merger.fit(unlabeled)
    with pytest.raises(NotFittedError):
        check_is_fitted(merger)
    assert not [k for k in vars(merger) if k.endswith("_") and not k.startswith("_")]


@pytest.mark.parametrize(
    ("name", "change"),
    [
        ("task_arithmetic", {"scaling": 0.9}),
        ("ties", {"top_k": 0.9, "merge": "mean"}),
        ("surgery", {"base": "ties"}),
        ("ft_classifier", {"scaling": 0.9}),
        ("procrustes", {"base": "ties", "scaling": 0.9}),
    ],
)
def test_set_params_after_fit_waits_for_the_next_fit(problem, unlabeled, name, change):
    pre, experts, heads, data = problem
    est = METHODS[name]((pre, experts, heads)).fit(unlabeled)
    assert set(est.merge_params_) >= set(change)
    before = est.transform().state_dict()
    est.set_params(**change)
    after = est.transform().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    est.fit(unlabeled)
    assert {k: est.merge_params_[k] for k in change} == change
    changed = est.transform().state_dict()
    assert any(not torch.equal(before[k], changed[k]) for k in before)


@pytest.mark.parametrize("name", ["adamerging_layerwise", "surgery", "ft_classifier", "procrustes", "moma"])
def test_fits_never_seed_the_global_generator_that_threads_share(problem, unlabeled, monkeypatch, name):
    """Concurrent fits in threads share torch's global generator: a fit seeding it (even inside
    ``fork_rng``) changes the other fits' draws; every draw must come from the fit's own generators."""

    class Untouchable:
        def __getattr__(self, attr):
            raise AssertionError(f"fit used the global generator ({attr})")

    def no_fork(*args, **kwargs):
        raise AssertionError("fit forked the global generator")

    make = METHODS.get(name, lambda m: MOMAMerger(*m, n_steps=3, random_state=0))
    expected = make(problem[:3]).fit(unlabeled).transform().state_dict()
    state = torch.get_rng_state()
    monkeypatch.setattr(torch.random, "default_generator", Untouchable())
    monkeypatch.setattr(torch.random, "fork_rng", no_fork)
    got = make(problem[:3]).fit(unlabeled).transform().state_dict()
    monkeypatch.undo()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("name", ["adamerging_layerwise", "surgery", "ft_classifier", "procrustes", "moma"])
def test_fit_inside_no_grad_or_inference_mode_fits_as_outside(problem, unlabeled, name, mode):
    make = METHODS.get(name, lambda m: MOMAMerger(*m, n_steps=3, random_state=0))
    expected = make(problem[:3]).fit(unlabeled).transform().state_dict()
    with getattr(torch, mode)():
        est = make(problem[:3]).fit(unlabeled)
        assert not torch.is_grad_enabled()  # the caller's mode is back
    got = est.transform().state_dict()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "weight_averaging", "pretrained", "individual"])
def test_scoring_refuses_logits_that_are_not_batch_by_classes(name):
    """An encoder returning (batch, 1, features) gave (batch, 1, classes) logits, whose argmax broadcast
    against the labels into an n × n comparison: accuracies above 1."""

    class Tower(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 4)

        def forward(self, x):
            return self.lin(x).unsqueeze(1)

    torch.manual_seed(0)
    pre = Tower()
    experts = {t: Tower() for t in ("a", "b")}
    heads = {t: torch.nn.Linear(4, 3) for t in ("a", "b")}
    data = {t: (torch.randn(20, 5), torch.randint(3, (20,))) for t in ("a", "b")}
    est = METHODS[name]((pre, experts, heads)).fit()
    with pytest.raises(ValueError, match=r"logits of shape \(20, 1, 3\) for 20 inputs; expected \(batch, classes\)"):
        est.score_per_task(data)


@pytest.mark.parametrize("name", ["adamerging_taskwise", "surgery", "ft_classifier", "procrustes"])
def test_inputs_of_another_shape_are_refused_before_any_forward_pass(problem, unlabeled, monkeypatch, name):
    pre, experts, heads, _ = problem
    bad = {**unlabeled, "task1": unlabeled["task1"][:, :-1]}
    calls = []
    monkeypatch.setattr(type(pre), "forward", lambda self, *a, **k: calls.append(self) or 1 / 0)  # the encoder
    est = METHODS[name]((pre, experts, heads))
    with pytest.raises(ValueError, match=r"X\['task1'\] has samples of shape .*every task's inputs must fit"):
        est.fit(bad)
    assert calls == []


def test_every_method_reports_extra_params_and_baselines_say_what_they_take(problem, unlabeled, tmp_path):
    pre, experts, heads, _ = problem
    assert MOMAMerger(pre, experts, heads, n_steps=1).fit(unlabeled).extra_params_ == 0
    paths = {}
    for t, m in experts.items():
        paths[t] = tmp_path / f"{t}.pt"
        torch.save(m.state_dict(), paths[t])
    MOMAMerger(pre, paths, heads, n_steps=1).fit(unlabeled)  # MOMAMerger reads paths
    with pytest.raises(
        TypeError,
        match=r"\['task0'\] must be a torch.nn.Module, got PosixPath; only MOMAMerger's finetuned_encoders take",
    ):
        TaskArithmetic(pre, paths, heads).fit()


def test_a_head_given_as_a_path_is_refused_with_the_head_loader_as_the_hint(problem, tmp_path):
    pre, experts, heads, _ = problem
    path = tmp_path / "head.pt"
    torch.save(heads["task0"].state_dict(), path)
    with pytest.raises(TypeError, match=r"heads\['task0'\] must be a torch.nn.Module.*head_from_checkpoint"):
        MOMAMerger(pre, experts, {**heads, "task0": path}, n_steps=1).fit({})
