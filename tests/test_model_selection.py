"""Model selection: TaskKFold, the per-task scorer, GridSearchCV over sparsity, clone sharing, scale-out."""

import copy
import gc
import math

import joblib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score, cross_validate
from torch import nn

import momaestimator.merger as merger_module
import momaestimator.merging.functional as functional
from momaestimator import MergedModel, MOMAMerger, TaskKFold, TaskSamples, per_task_accuracy_scorer

GRID = {"sparsity": [0.0, 0.5, 0.9]}
FAST = dict(n_steps=10, batch_size=8, random_state=0)


@pytest.fixture(scope="module")
def samples(problem):
    """The 3-task toy problem's data as one labelled TaskSamples (24 samples per task)."""
    data = problem[3]
    return TaskSamples.from_arrays({t: x for t, (x, _) in data.items()}, {t: y for t, (_, y) in data.items()})


@pytest.fixture()
def merger(problem):
    pre, experts, heads, _ = problem
    return MOMAMerger(pre, experts, heads, **FAST)


def search(merger, **kw):
    return GridSearchCV(merger, GRID, cv=TaskKFold(3), scoring=per_task_accuracy_scorer, refit="mean", **kw)


def unequal_samples(sizes=(24, 10, 7)):
    return TaskSamples.from_arrays({f"t{i}": np.zeros((n, 2)) for i, n in enumerate(sizes)})


# ---------------------------------------------------------------------------------- TaskKFold
@pytest.mark.parametrize("shuffle, random_state", [(False, None), (True, 0)])
@pytest.mark.parametrize("n_splits", [2, 3, 5])
def test_every_fold_holds_every_task_in_train_and_test_in_proportion(n_splits, shuffle, random_state):
    X = unequal_samples()
    sizes = np.bincount(X.task_ids)
    splits = list(TaskKFold(n_splits, shuffle=shuffle, random_state=random_state).split(X))
    assert len(splits) == n_splits
    all_test = np.concatenate([test for _, test in splits])
    assert np.array_equal(np.sort(all_test), np.arange(len(X)))  # every sample tested exactly once
    for train, test in splits:
        assert np.intersect1d(train, test).size == 0 and len(train) + len(test) == len(X)
        n_test = np.bincount(X[test].task_ids, minlength=len(sizes))
        n_train = np.bincount(X[train].task_ids, minlength=len(sizes))
        assert np.all(n_test >= sizes // n_splits) and np.all(n_test <= -(-sizes // n_splits))
        assert np.array_equal(n_train, sizes - n_test) and np.all(n_train > 0)
    fold_sizes = [len(test) for _, test in splits]
    assert max(fold_sizes) - min(fold_sizes) <= 1  # spare samples rotate over folds


def test_exact_fractions_when_sizes_divide(samples):
    for train, test in TaskKFold(3).split(samples):
        assert np.bincount(samples[test].task_ids).tolist() == [8, 8, 8]
        assert np.bincount(samples[train].task_ids).tolist() == [16, 16, 16]


def test_shuffle_is_within_tasks_and_seeded():
    X = unequal_samples()
    a = [test for _, test in TaskKFold(3, shuffle=True, random_state=1).split(X)]
    b = [test for _, test in TaskKFold(3, shuffle=True, random_state=1).split(X)]
    c = [test for _, test in TaskKFold(3, shuffle=True, random_state=2).split(X)]
    plain = [test for _, test in TaskKFold(3).split(X)]
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not all(np.array_equal(u, v) for u, v in zip(a, c))
    # unshuffled: each task's test block is a contiguous run of that task's samples
    for test in plain:
        for tid in range(3):
            pos = test[X.task_ids[test] == tid]
            assert np.array_equal(pos, np.arange(pos[0], pos[0] + len(pos)))


def test_plain_kfold_would_put_whole_tasks_in_one_fold(samples):
    # the reason TaskKFold exists: KFold on task-ordered data tests each fold on one task only
    assert [len(np.unique(samples[test].task_ids)) for _, test in KFold(3).split(samples)] == [1, 1, 1]


def test_task_kfold_errors():
    X = unequal_samples((10, 2))
    with pytest.raises(ValueError, match=r"task 't1' has 2 samples, fewer than n_splits=3"):
        list(TaskKFold(3).split(X))
    with pytest.raises(ValueError, match="at least 2 folds"):
        TaskKFold(1)
    with pytest.raises(ValueError, match="must be an integer"):
        TaskKFold(2.5)
    with pytest.raises(ValueError, match="shuffle is False"):
        TaskKFold(3, random_state=0)
    with pytest.raises(TypeError, match="TaskKFold splits a TaskSamples"):
        list(TaskKFold(2).split(np.zeros((10, 2))))
    with pytest.raises(ValueError, match="y has 3 entries for 12 samples"):
        list(TaskKFold(2).split(X, np.zeros(3)))
    assert TaskKFold(4).get_n_splits() == 4
    assert repr(TaskKFold(4)) == "TaskKFold(n_splits=4, random_state=None, shuffle=False)"


# ---------------------------------------------------------------------------------- scorer
def test_scorer_returns_mean_and_every_task(merger, samples):
    merger.fit(samples)
    scores = per_task_accuracy_scorer(merger, samples)
    assert list(scores) == ["mean", "task0", "task1", "task2"]
    assert scores["mean"] == merger.score(samples) == pytest.approx(np.mean([scores[t] for t in merger.tasks_]))
    assert isinstance(merger.score(samples), float)
    assert {t: scores[t] for t in merger.tasks_} == merger.score_per_task(samples)
    # a task missing from X keeps its column (nan); the mean is over the tasks present
    part = samples[samples.task_ids != 1]
    partial = per_task_accuracy_scorer(merger, part)
    assert list(partial) == list(scores) and math.isnan(partial["task1"])
    assert partial["mean"] == pytest.approx((scores["task0"] + scores["task2"]) / 2)


def test_scorer_refuses_a_task_named_mean(merger, samples):
    merger.fit(samples)
    merger.tasks_ = ["mean", "task1", "task2"]
    with pytest.raises(ValueError, match="task is named 'mean'"):
        per_task_accuracy_scorer(merger, samples)


# ---------------------------------------------------------------------------------- searches
def test_grid_search_over_sparsity_with_task_kfold_and_per_task_scores(merger, samples):
    gs = search(merger).fit(samples)
    assert gs.best_params_["sparsity"] in GRID["sparsity"]
    res = gs.cv_results_
    for task in ["task0", "task1", "task2"]:
        assert res[f"mean_test_{task}"].shape == (3,)
        assert np.all((res[f"mean_test_{task}"] >= 0) & (res[f"mean_test_{task}"] <= 1))
        assert f"split2_test_{task}" in res and f"rank_test_{task}" in res
    per_task_means = np.mean([res[f"mean_test_{t}"] for t in ["task0", "task1", "task2"]], axis=0)
    assert np.allclose(res["mean_test_mean"], per_task_means)
    assert gs.best_index_ == int(np.argmin(res["rank_test_mean"]))
    assert gs.best_score_ == res["mean_test_mean"][gs.best_index_]
    # the refit estimator is the best candidate fitted on all of X
    best = gs.best_estimator_
    assert best.sparsity == gs.best_params_["sparsity"] and best.pretrained_encoder is merger.pretrained_encoder
    ref = clone(merger).set_params(**gs.best_params_).fit(samples)
    assert all(torch.equal(best.mask_[k], ref.mask_[k]) for k in ref.mask_)
    model = best.transform()
    assert isinstance(model, MergedModel)
    x = samples.task_inputs("task1", samples.indices_by_task()["task1"])
    with torch.no_grad():
        assert model(x, "task1").shape == (len(x), 3)
    assert gs.score(samples) == pytest.approx(per_task_accuracy_scorer(best, samples)["mean"])


def test_fit_with_and_without_y_is_identical(merger, samples, problem):
    a = clone(merger).fit(samples)
    b = clone(merger).fit(samples, samples.targets())
    unlabeled = TaskSamples.from_arrays({t: x for t, (x, _) in problem[3].items()})  # no labels at all
    c = clone(merger).fit(unlabeled)
    for other in (b, c):
        assert all(torch.equal(a.mask_[k], other.mask_[k]) for k in a.mask_)
        assert all(torch.equal(a.rotations_[t], other.rotations_[t]) for t in a.rotations_)
    # labels passed as y are the ones used for scoring
    assert a.score(unlabeled, samples.targets()) == a.score(samples)


def test_cross_val_score_and_cross_validate(merger, samples):
    floats = cross_val_score(merger, samples, cv=TaskKFold(3))
    assert floats.shape == (3,) and floats.dtype == float and np.all((floats >= 0) & (floats <= 1))
    res = cross_validate(merger, samples, cv=TaskKFold(3), scoring=per_task_accuracy_scorer, return_estimator=True)
    assert {"test_mean", "test_task0", "test_task1", "test_task2"} <= set(res)
    assert np.array_equal(res["test_mean"], floats)  # same seeds, same folds: same fits
    assert all(est.pretrained_encoder is merger.pretrained_encoder for est in res["estimator"])


# ---------------------------------------------------------------------------------- clone sharing
def user_tensors(merger):
    mods = [merger.pretrained_encoder, *merger.finetuned_encoders.values(), *merger.heads.values()]
    return [t for m in mods for t in list(m.parameters()) + list(m.buffers())]


def test_clone_makes_no_copy_of_any_user_module(merger, samples, monkeypatch):
    deep_copied = []
    real_deepcopy = copy.deepcopy

    def spy(x, memo=None, _nil=[]):  # noqa: B006 -- copy.deepcopy's own signature
        deep_copied.append(type(x))
        return real_deepcopy(x, memo, _nil)

    monkeypatch.setattr(copy, "deepcopy", spy)
    for original in (merger, clone(merger).fit(samples)):
        gc.collect()
        tensors_before = {id(o) for o in gc.get_objects() if issubclass(type(o), torch.Tensor)}
        deep_copied.clear()
        c = clone(original)
        gc.collect()
        new_tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor) and id(o) not in tensors_before]
        assert new_tensors == []  # not one Parameter, buffer or tensor was created
        assert not any(issubclass(t, (nn.Module, torch.Tensor, dict)) for t in deep_copied), deep_copied
        assert c.pretrained_encoder is original.pretrained_encoder
        assert c.finetuned_encoders is original.finetuned_encoders and c.heads is original.heads
        assert [t.data_ptr() for t in user_tensors(c)] == [t.data_ptr() for t in user_tensors(original)]
        assert not hasattr(c, "mask_") and c.get_params(deep=False).keys() == original.get_params(deep=False).keys()
    # everything that is not a module is cloned as scikit-learn does (a RandomState is copied, not shared)
    rs = np.random.RandomState(3)
    c = clone(clone(merger).set_params(random_state=rs))
    assert c.random_state is not rs and c.random_state.randint(1000) == np.random.RandomState(3).randint(1000)


def test_search_copies_an_encoder_only_where_a_merged_model_is_built(merger, samples, monkeypatch):
    calls = {"transform": 0, "encoder_copies": 0, "head_copies": 0, "full_module_copies": []}
    pre, heads = merger.pretrained_encoder, merger.heads
    real_transform, real_clone_with_state, real_deepcopy = (
        MOMAMerger.transform,
        functional.clone_with_state,
        copy.deepcopy,
    )

    def transform(self, X=None):
        calls["transform"] += 1
        return real_transform(self, X)

    def clone_with_state(module, state):
        calls["encoder_copies" if module is pre else "head_copies"] += 1
        return real_clone_with_state(module, state)

    def deepcopy(x, memo=None, _nil=[]):  # noqa: B006 -- copy.deepcopy's own signature
        if isinstance(x, nn.Module) and any(id(t) not in (memo or {}) for t in x.state_dict(keep_vars=True).values()):
            calls["full_module_copies"].append(type(x).__name__)  # a copy that duplicates real weights
        return real_deepcopy(x, memo, _nil)

    monkeypatch.setattr(MOMAMerger, "transform", transform)
    monkeypatch.setattr(merger_module, "clone_with_state", clone_with_state)
    monkeypatch.setattr(functional, "clone_with_state", clone_with_state)
    monkeypatch.setattr(copy, "deepcopy", deepcopy)

    gs = search(merger, n_jobs=1).fit(samples)
    n_scored = len(GRID["sparsity"]) * 3  # candidates × folds; the refit is not scored
    assert calls["transform"] == n_scored  # one merged model per scoring call, none per clone or fit
    assert calls["encoder_copies"] == n_scored
    assert calls["head_copies"] == n_scored * len(heads)
    assert calls["full_module_copies"] == []  # fits only make weightless structure copies
    gs.best_estimator_.transform()
    assert calls["encoder_copies"] == n_scored + 1


# ---------------------------------------------------------------------------------- scale-out
def assert_same_search(a, b):
    assert a.best_params_ == b.best_params_ and a.best_index_ == b.best_index_
    for key, value in a.cv_results_.items():
        if "test" in key:
            assert np.array_equal(value, b.cv_results_[key]), key
    assert all(torch.equal(a.best_estimator_.mask_[k], b.best_estimator_.mask_[k]) for k in a.best_estimator_.mask_)
    rot_a, rot_b = a.best_estimator_.rotations_, b.best_estimator_.rotations_
    assert all(torch.equal(rot_a[t], rot_b[t]) for t in rot_a)


@pytest.fixture(scope="module")
def local_search(problem, samples):
    pre, experts, heads, _ = problem
    return search(MOMAMerger(pre, experts, heads, **FAST), n_jobs=1).fit(samples)


def test_n_jobs_2_equals_n_jobs_1(problem, samples, local_search):
    pre, experts, heads, _ = problem
    with joblib.parallel_config(backend="loky"):
        parallel = search(MOMAMerger(pre, experts, heads, **FAST), n_jobs=2).fit(samples)
    assert_same_search(local_search, parallel)


@pytest.mark.parametrize(
    "processes",
    [
        pytest.param(False, id="threads"),  # in-process workers, tasks still go through the scheduler over TCP
        pytest.param(True, id="processes", marks=pytest.mark.slow),  # spawned workers import torch: ~15-45 s
    ],
)
def test_dask_backend_equals_local(problem, samples, local_search, processes):
    distributed = pytest.importorskip("distributed")
    pre, experts, heads, _ = problem
    # loopback only; in-process workers need the TCP protocol to accept a host
    kw = {"processes": True} if processes else {"processes": False, "protocol": "tcp"}
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None, **kw
        ) as cluster,
        distributed.Client(cluster),
        joblib.parallel_config(backend="dask"),
    ):
        remote = search(MOMAMerger(pre, experts, heads, **FAST), n_jobs=-1).fit(samples)
    assert_same_search(local_search, remote)


def test_folds_hold_every_class_of_every_task_even_for_data_sorted_by_class():
    import numpy as np

    from momaestimator import TaskKFold, TaskSamples

    y = {"a": np.repeat([0, 1, 2, 3], [10, 10, 5, 5]), "b": np.repeat([0, 1], [9, 6])}
    X = TaskSamples.from_arrays({t: np.zeros((len(v), 2)) for t, v in y.items()}, y)
    for split_y in (None, X.targets()):  # labels stored in X, or given as y
        for _, test in TaskKFold(5).split(X, split_y):
            sub = X[test]
            for i, t in enumerate(X.tasks):
                counts = np.bincount(sub.targets()[sub.task_ids == i], minlength=len(np.unique(y[t])))
                share = np.bincount(y[t]) / 5
                assert ((counts >= np.floor(share)) & (counts <= np.ceil(share))).all()  # each class in proportion
    # without labels: consecutive blocks, as documented
    unlabeled = TaskSamples.from_arrays({t: np.zeros((len(v), 2)) for t, v in y.items()})
    first_test = next(iter(TaskKFold(5).split(unlabeled)))[1]
    assert first_test.tolist() == [0, 1, 2, 3, 4, 5, 30, 31, 32]


def test_the_scorer_reaches_the_merger_inside_a_pipeline_and_a_fitted_search(merger, samples):
    from sklearn.pipeline import make_pipeline

    plain = cross_validate(merger, samples, cv=TaskKFold(3), scoring=per_task_accuracy_scorer)
    piped = cross_validate(make_pipeline(merger), samples, cv=TaskKFold(3), scoring=per_task_accuracy_scorer)
    assert not np.isnan(piped["test_mean"]).any()
    np.testing.assert_array_equal(piped["test_mean"], plain["test_mean"])
    np.testing.assert_array_equal(piped["test_task1"], plain["test_task1"])
    fitted = search(merger).fit(samples)
    assert per_task_accuracy_scorer(fitted, samples) == per_task_accuracy_scorer(fitted.best_estimator_, samples)
    with pytest.raises(TypeError, match="per_task_accuracy_scorer scores a merger.*got KFold"):
        per_task_accuracy_scorer(KFold(3), samples)


def test_every_prefix_of_a_training_part_holds_every_task_in_proportion(samples, problem):
    from sklearn.model_selection import learning_curve

    tasks = np.asarray(samples.task_ids)
    for train, test in TaskKFold(3).split(samples):
        assert np.array_equal(np.sort(train), np.setdiff1d(np.arange(len(tasks)), test))
        for n in (3, 9, len(train) // 2):
            counts = np.bincount(tasks[train[:n]], minlength=3)
            assert counts.max() - counts.min() <= 1, (n, counts)
        for t in range(3):  # each task's positions keep their order (the fit sees the same data)
            own = train[tasks[train] == t]
            assert np.array_equal(own, np.sort(own))
    sizes, train_scores, test_scores = learning_curve(
        MOMAMerger(*problem[:3], n_steps=2, random_state=0),
        samples,
        None,
        cv=TaskKFold(3),
        train_sizes=[0.25, 1.0],
    )
    assert not np.isnan(test_scores).any() and sizes.tolist() == [12, 48]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(storage=[torch.zeros(2, 1)]), TypeError, "storage must be a dict"),
        (dict(labels={"a": torch.zeros(3)}), ValueError, r"labels\['a'\] has 3 entries for 2 samples"),
        (dict(labels={"c": torch.zeros(2)}), ValueError, "labels name task 'c'"),
        (dict(task_ids=[0, 1]), ValueError, "task_ids and sample_ids together"),
        (dict(task_ids=[0, 1], sample_ids=[0]), ValueError, "task_ids has 2 entries, sample_ids 1"),
        (dict(task_ids=[0, 2], sample_ids=[0, 0]), ValueError, r"task_ids must lie in \[0, 2\)"),
        (dict(task_ids=[0, 1], sample_ids=[0, 3]), ValueError, "sample_ids must index"),
    ],
)
def test_task_samples_refuses_inconsistent_parts_instead_of_misaligning_labels(kwargs, error, match):
    from momaestimator import TaskSamples

    parts = dict(storage={"a": torch.zeros(2, 1), "b": torch.ones(3, 1)}) | kwargs
    with pytest.raises(error, match=match):
        TaskSamples(**parts)
