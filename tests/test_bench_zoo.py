"""Tests for the embedded benchmark zoo (reduced config, real images)."""

import time

import numpy as np
import pytest
import torch

from momaestimator import LinearHead
from momaestimator.bench import zoo as zoo_module
from momaestimator.bench.datasets import available_tasks, load_generic_pool
from momaestimator.bench.zoo import TaskSplit, Zoo, ZooConfig, build_zoo, quick_config, regime

TASKS = ["digits", "faces"]


def _require_sources():
    missing = [t for t in TASKS if t not in available_tasks()]
    if missing:
        pytest.fail(f"task sources not installed: {missing}; run scripts/setup.sh test")
    try:
        load_generic_pool(n=10)
    except RuntimeError as exc:  # pragma: no cover - depends on the machine
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A quick zoo built cold into a fresh cache, then loaded again from that cache."""
    _require_sources()
    cache = tmp_path_factory.mktemp("zoo_cache")
    config = quick_config()
    start = time.perf_counter()
    cold = build_zoo(TASKS, seed=0, config=config, cache_dir=cache, verbose=False)
    cold_seconds = time.perf_counter() - start
    start = time.perf_counter()
    warm = build_zoo(TASKS, seed=0, config=config, cache_dir=cache, verbose=False)
    warm_seconds = time.perf_counter() - start
    return cold, warm, cold_seconds, warm_seconds, cache


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_quick_config_is_smaller_than_default():
    quick, default = quick_config(), ZooConfig()
    assert quick.width < default.width and quick.expert_steps < default.expert_steps
    assert quick_config(anchor_weight=0.0).anchor_weight == 0.0
    assert default.anchor_weight > 0  # the benchmark zoo uses the feature anchor


def test_structure_and_shapes(built):
    zoo = built[0]
    config = zoo.config
    assert isinstance(zoo, Zoo) and zoo.tasks == TASKS
    from open_clip.transformer import VisionTransformer

    assert isinstance(zoo.pretrained, VisionTransformer)
    assert set(zoo.experts) == set(zoo.heads) == set(zoo.data) == set(TASKS)
    for task in TASKS:
        split = zoo.data[task]
        assert isinstance(split, TaskSplit)
        for X, y in ((split.X_train, split.y_train), (split.X_val, split.y_val), (split.X_test, split.y_test)):
            assert X.dtype == torch.float32 and X.shape[1:] == (3, 28, 28) and len(X) == len(y) > 0
            assert y.dtype == torch.int64 and int(y.max()) < split.n_classes
        assert len(split.X_test) <= config.max_test
        assert len(split.X_train) + len(split.X_val) <= config.max_train
        features = zoo.experts[task](split.X_test[:5])
        assert features.shape == (5, config.output_dim)
        assert zoo.heads[task](features).shape == (5, split.n_classes)
    assert {"pretrain", "total", "cached", *TASKS} <= set(zoo.build_seconds)
    assert zoo.build_seconds["cached"] is False


def test_splits_are_disjoint(built):
    split = built[0].data["digits"]
    train = {row.numpy().tobytes() for row in split.X_train}
    assert not any(row.numpy().tobytes() in train for row in split.X_val)
    # validation is stratified: every class appears
    assert set(split.y_val.tolist()) == set(range(split.n_classes))


def test_heads_are_frozen_normalising_linear_heads(built):
    zoo = built[0]
    for task, head in zoo.heads.items():
        assert isinstance(head, LinearHead) and head.normalize
        assert not any(p.requires_grad for p in head.parameters())
        assert head.in_features == zoo.config.output_dim and head.out_features == zoo.data[task].n_classes
        # logits do not depend on the feature norm
        z = torch.randn(4, head.in_features)
        torch.testing.assert_close(head(z), head(3.0 * z))


def test_experts_beat_pretrained_on_their_own_task(built):
    zoo = built[0]
    for task in TASKS:
        split = zoo.data[task]
        pre = zoo_module.accuracy(zoo.pretrained, zoo.heads[task], split.X_test, split.y_test)
        expert = zoo_module.accuracy(zoo.experts[task], zoo.heads[task], split.X_test, split.y_test)
        assert expert > pre, (task, pre, expert)
        # experts moved away from the pretrained weights, pretrained tower untouched by fine-tuning
        assert not _same_weights(zoo.experts[task], zoo.pretrained)


def test_cache_loads_equal_weights_fast(built):
    cold, warm, cold_seconds, warm_seconds, _ = built
    assert warm.build_seconds["cached"] is True
    assert warm_seconds < cold_seconds / 3
    assert _same_weights(cold.pretrained, warm.pretrained)
    for task in TASKS:
        assert _same_weights(cold.experts[task], warm.experts[task])
        assert torch.equal(cold.heads[task].weight, warm.heads[task].weight)
        assert torch.equal(cold.data[task].X_val, warm.data[task].X_val)


def test_same_seed_gives_bit_identical_expert(built):
    """Rebuilding an expert from the same pretrained tower (no cache) gives identical weights."""
    cold = built[0]
    config = cold.config
    pre_state = cold.pretrained.state_dict()
    with zoo_module._Threads(config.num_threads):  # float reductions depend on the thread count
        out = zoo_module._expert(config, 0, "faces", lambda fields, seed, code="": {"state": pre_state})
    rebuilt = zoo_module.make_tower(config)
    rebuilt.load_state_dict(out["state"])
    assert _same_weights(rebuilt, cold.experts["faces"])
    assert torch.equal(out["head_weight"], cold.heads["faces"].weight)


def test_pretraining_is_deterministic(built):
    config = built[0].config
    with zoo_module._Threads(config.num_threads):
        out = zoo_module._pretrain(zoo_module._pretrain_fields(config), 0)
    again = zoo_module.make_tower(config)
    again.load_state_dict(out["state"])
    assert _same_weights(again, built[0].pretrained)


def test_regime_report(built):
    zoo = built[0]
    result = regime(zoo, lambdas=[0.3, 0.7])
    assert result["lambda"] in (0.3, 0.7)
    assert set(result["per_task"]) == set(TASKS)
    for key in ("pretrained", "task_arithmetic", "individual"):
        assert 0.0 <= result[key] <= 100.0
        assert np.isclose(result[key], np.mean([v[key] for v in result["per_task"].values()]))
    gap = result["individual"] - result["pretrained"]
    assert np.isclose(result["recovered_fraction"], (result["task_arithmetic"] - result["pretrained"]) / gap)
    assert set(result["val_curve"]) == {0.3, 0.7}


def test_uncached_rebuild_is_bit_identical(built):
    """A cold build without any cache reproduces the cached zoo exactly (same seed, same threads)."""
    cold = built[0]
    again = build_zoo(["faces"], seed=0, config=cold.config, cache_dir=False, verbose=False)
    assert again.build_seconds["cached"] is False
    assert _same_weights(again.pretrained, cold.pretrained)
    assert _same_weights(again.experts["faces"], cold.experts["faces"])


def test_changed_code_or_data_sources_are_never_served_from_the_cache(built, monkeypatch):
    import dataclasses

    from joblib import Memory

    cache, config = built[4], quick_config()
    memory = Memory(str(cache), verbose=0)
    pretrain = memory.cache(zoo_module._pretrain)
    expert = memory.cache(zoo_module._expert, ignore=["pretrain_cache"])
    fields, key, code = zoo_module._pretrain_fields(config), dataclasses.replace(config, num_threads=None), None
    code = zoo_module.code_version()
    assert pretrain.check_call_in_cache(fields, 0, code)
    assert expert.check_call_in_cache(key, 0, "digits", pretrain, code)
    # another version of the benchmark's code or data: neither the tower nor an expert is reused
    assert not pretrain.check_call_in_cache(fields, 0, "another version")
    assert not expert.check_call_in_cache(key, 0, "digits", pretrain, "another version")
    monkeypatch.setenv("MOMA_FASHION_MNIST_DIR", "/elsewhere")
    assert zoo_module.code_version() != code


def test_pretraining_and_anchor_images_are_disjoint_for_any_anchor_pool_size():
    config = quick_config()  # anchor_pool_size 256, not the default 4096
    pretrain_config = ZooConfig(**zoo_module._pretrain_fields(config))  # what _pretrain rebuilds
    X_pretrain, _ = zoo_module._pool(pretrain_config, 0)
    X_part, X_anchor = zoo_module._pool(config, 0)  # the partition of one pool the experts' anchors use
    assert torch.equal(X_pretrain, X_part)  # so pretraining images are never anchor images
    seen = {row.numpy().tobytes() for row in X_pretrain}
    assert sum(row.numpy().tobytes() in seen for row in X_anchor) <= 2  # the pool's own duplicates (was 64)
