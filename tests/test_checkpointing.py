"""Gradient checkpointing of the encoder's blocks: which blocks, same numbers, less saved memory."""

import copy

import pytest
import torch
from conftest import SAME_STEP_FIT, FlatEncoder, assert_same_fit, counting_loaders, fingerprint_all
from open_clip.transformer import ResidualAttentionBlock
from sklearn.base import clone
from torch import nn

from momaestimator import MOMAMerger, toy
from momaestimator.merging import checkpointing
from momaestimator.merging.checkpointing import checkpoint_blocks, find_blocks
from momaestimator.merging.functional import encode, structure_copy


@pytest.fixture(scope="module")
def tower():
    return toy.make_tower(layers=3, width=16, random_state=0)


def _state(module):
    return {k: v.detach().clone().requires_grad_(v.is_floating_point()) for k, v in module.state_dict().items()}


def _saved_activation_bytes(skeleton, state, x):
    """Bytes of the non-weight tensors autograd keeps between forward and backward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        encode(skeleton, state, x)
    weights = {v.untyped_storage().data_ptr() for v in state.values()}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def test_find_blocks_picks_the_repeated_blocks(tower):
    assert find_blocks(tower) == [f"transformer.resblocks.{i}" for i in range(3)]
    assert find_blocks(tower, ResidualAttentionBlock) == find_blocks(tower)
    assert find_blocks(tower, False) == []
    # outermost only: the Linear layers inside the blocks' MLPs are not separate blocks
    nested = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in range(2)])
    assert find_blocks(nested) == ["0", "1"]
    assert find_blocks(nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2)), nn.Linear) == ["0.0", "1"]
    # a heterogeneous Sequential (an MLP) is not a stack of blocks
    with pytest.raises(ValueError, match="no repeated blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.LayerNorm(2)))


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        ("yes", TypeError, "gradient_checkpointing must be True, False, an nn.Module subclass"),
        ((nn.Linear, int), TypeError, "gradient_checkpointing must be"),
        ((), TypeError, "gradient_checkpointing must be"),
        (nn.Conv3d, ValueError, r"no submodule of class Conv3d"),
    ],
)
def test_find_blocks_names_a_bad_specification(tower, spec, error, match):
    with pytest.raises(error, match=match):
        find_blocks(tower, spec)


def test_checkpointed_blocks_give_the_same_values_and_gradients(tower):
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    skeleton = structure_copy(tower)
    ckpt = checkpoint_blocks(skeleton, find_blocks(skeleton))
    grads = []
    for s in (skeleton, ckpt):
        state = _state(tower)
        z = encode(s, state, x)
        z.square().sum().backward()
        grads.append((z.detach(), {k: v.grad for k, v in state.items() if v.grad is not None}))
    (z0, g0), (z1, g1) = grads
    assert torch.equal(z0, z1)
    assert g0.keys() == g1.keys() and len(g0) == len(list(tower.parameters()))
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-6, atol=1e-7), k
    # the copy is patched, the skeleton it came from is not
    assert all("forward" not in m.__dict__ for m in skeleton.modules())
    assert sum("forward" in m.__dict__ for m in ckpt.modules()) == 3


def test_checkpointing_keeps_only_the_blocks_inputs(tower):
    x = torch.randn(8, 3, 8, 8)
    skeleton = structure_copy(tower)
    plain = _saved_activation_bytes(skeleton, _state(tower), x)
    ckpt = _saved_activation_bytes(checkpoint_blocks(skeleton, find_blocks(skeleton)), _state(tower), x)
    # per block the input (8 x 5 tokens x 16 floats) instead of its layer norms, attention and MLP
    assert ckpt < plain / 3


def test_blocks_run_as_they_are_without_gradients(tower, monkeypatch):
    skeleton = structure_copy(tower)
    ckpt = checkpoint_blocks(skeleton, find_blocks(skeleton))

    def fail(*args, **kwargs):
        raise AssertionError("checkpoint called under no_grad")

    monkeypatch.setattr(checkpointing, "checkpoint", fail)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(encode(ckpt, tower.state_dict(), x), tower(x))
    with pytest.raises(AssertionError, match="checkpoint called"):
        encode(ckpt, _state(tower), x)  # with gradients the blocks do go through checkpoint


@pytest.mark.parametrize(
    ("batching", "micro", "precision"),
    [("sequential", None, None), ("joint", None, None), ("joint", 7, None), ("sequential", None, "bf16")],
)
def test_fit_with_checkpointing_takes_the_same_steps(batching, micro, precision):
    pre, experts, heads, data = toy.make_problem(n_tasks=2, layers=2, random_state=1, finetune_steps=10)
    X = {t: x for t, (x, _) in data.items()}
    before = fingerprint_all(pre, experts, heads)
    kw = dict(SAME_STEP_FIT, task_batching=batching, micro_batch_size=micro, precision=precision)
    plain = MOMAMerger(pre, experts, heads, **kw).fit(X)
    ckpt = MOMAMerger(pre, experts, heads, gradient_checkpointing=True, **kw).fit(X)
    assert_same_fit(plain, ckpt)
    # the steps moved the rotations, so the comparison above compared something
    assert any(not torch.allclose(q, torch.eye(len(q)), atol=1e-4) for q in ckpt.rotations_.values())
    assert fingerprint_all(pre, experts, heads) == before
    assert all("forward" not in m.__dict__ for m in pre.modules())


def test_estimator_rejects_bad_checkpointing_before_any_work():
    pre, experts, heads, data = toy.make_problem(n_tasks=2, random_state=0)
    X = {t: x for t, (x, _) in data.items()}
    calls = []
    lazy = counting_loaders(experts, calls)
    with pytest.raises(TypeError, match="gradient_checkpointing must be True, False"):
        MOMAMerger(pre, lazy, heads, gradient_checkpointing="blocks").fit(X)
    with pytest.raises(ValueError, match=r"gradient_checkpointing=<class 'torch.nn.modules.conv.Conv3d'>"):
        MOMAMerger(pre, lazy, heads, gradient_checkpointing=nn.Conv3d).fit(X)
    assert calls == []  # no expert was read
    flat = FlatEncoder()
    with pytest.raises(ValueError, match=r"the encoder \(FlatEncoder\) has no repeated blocks"):
        MOMAMerger(flat, {t: copy.deepcopy(flat) for t in experts}, heads, gradient_checkpointing=True).fit(X)


def test_save_keeps_an_importable_block_class_and_drops_a_local_one(tmp_path):
    pre, experts, heads, data = toy.make_problem(n_tasks=2, random_state=0)
    X = {t: x for t, (x, _) in data.items()}
    merger = MOMAMerger(pre, experts, heads, n_steps=2, gradient_checkpointing=ResidualAttentionBlock).fit(X)
    assert clone(merger).gradient_checkpointing is ResidualAttentionBlock  # model selection clones it
    merger.save(tmp_path / "m.joblib")
    loaded = MOMAMerger.load(tmp_path / "m.joblib", pre, experts, heads)
    assert loaded.gradient_checkpointing is ResidualAttentionBlock

    class LocalBlock(ResidualAttentionBlock):
        pass

    merger.set_params(gradient_checkpointing=LocalBlock)
    merger.save(tmp_path / "local.joblib")
    assert MOMAMerger.load(tmp_path / "local.joblib", pre, experts, heads).gradient_checkpointing is False


def test_an_encoder_with_its_own_checkpointing_switched_on_fits_the_same():
    # open_clip's set_grad_checkpointing(True) (often left on by training scripts) recomputes in
    # backward, after the functional call: on the weightless copy it used to fail on meta tensors
    pre, experts, heads, data = toy.make_problem(n_tasks=2, layers=2, random_state=0)
    X = {t: x for t, (x, _) in data.items()}
    kw = dict(n_steps=4, sparsity=0.2, rotation_lr=0.01, validation_fraction=0.0, random_state=0)
    plain = MOMAMerger(pre, experts, heads, **kw).fit(X)
    for m in (pre, *experts.values()):
        m.set_grad_checkpointing(True)
    flagged = MOMAMerger(pre, experts, heads, **kw).fit(X)
    assert [h["loss"] for h in flagged.history_] == pytest.approx([h["loss"] for h in plain.history_], rel=1e-6)
    assert all(torch.equal(plain.mask_[k], flagged.mask_[k]) for k in plain.mask_)
    assert pre.transformer.grad_checkpointing is True  # the user's flag is left as it was
    assert structure_copy(pre).transformer.grad_checkpointing is False
