"""Merged weights computed inside the blocks (``recompute_merged_weights``): same steps, none kept."""

import contextlib
import copy
import gc
import weakref

import pytest
import torch
from conftest import SAME_STEP_FIT, FlatEncoder, assert_same_fit, counting_loaders, fingerprint_all
from sklearn.base import clone
from torch import nn

from momaestimator import MOMAMerger, toy
from momaestimator.merging.checkpointing import BlockMerge, find_blocks, recompute_blocks
from momaestimator.merging.fit import recomputed_blocks
from momaestimator.merging.functional import encode, structure_copy
from momaestimator.merging.mask import GlobalMask


@pytest.fixture(scope="module")
def problem():
    pre, experts, heads, data = toy.make_problem(n_tasks=2, layers=2, random_state=1, finetune_steps=10)
    return pre, experts, heads, {t: x for t, (x, _) in data.items()}


def _merge_setup(tower, sparsity=0.3):
    """τ (random), a mask over it, the full merged state and a BlockMerge of the blocks' weights."""
    gen = torch.Generator().manual_seed(0)
    theta0 = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    tau = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in theta0.items() if v.is_floating_point()}
    mask = GlobalMask(tau, sparsity, generator=gen)
    threshold = mask.threshold()
    blocks = find_blocks(tower)
    weights = {k for k, _ in tower.named_parameters()}
    inside = {k for k in mask.names if k in weights and any(k.startswith(b + ".") for b in blocks)}
    scores = dict(zip(mask.names, mask.scores))
    merge = BlockMerge({k: scores[k] for k in inside}, theta0, tau, 0.3, threshold)
    return theta0, tau, mask, threshold, blocks, inside, merge


def test_blocks_merge_their_weights_the_same_values_and_gradients():
    tower = toy.make_tower(layers=3, width=16, random_state=0)
    theta0, tau, mask, threshold, blocks, inside, merge = _merge_setup(tower)
    assert len(inside) == 3 * 12  # every weight of the three residual blocks
    skeleton = structure_copy(tower)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    # reference: the whole merged state as leaves (what the fit keeps without the option)
    full = {k: v.detach().requires_grad_(k in inside) for k, v in mask.merge(theta0, tau, 0.3).items()}
    z0 = encode(skeleton, {**theta0, **full}, x)
    z0.square().sum().backward()
    # merged inside the blocks: the blocks' entries are left out of the functional call's state
    patched = recompute_blocks(skeleton, blocks, activations=False, merge=merge)
    outside = {k: v for k, v in {**theta0, **full}.items() if k not in inside}
    assert len(outside) < len(theta0)
    z1 = encode(patched, outside, x)
    assert torch.equal(z0, z1)
    z1.square().sum().backward()
    for k in inside:  # the scores' buffer holds ∂L/∂θ of their entry (made a score gradient later)
        assert torch.equal(merge.scores[k].grad, full[k].grad), k
    with torch.no_grad():  # evaluation: merged block by block, no graph (fast attention path)
        assert torch.equal(encode(patched, outside, x), encode(skeleton, {**theta0, **full}, x))
    assert all("forward" not in m.__dict__ for m in skeleton.modules())


@pytest.mark.parametrize("activations", [False, True])
def test_no_merged_weight_outlives_its_block(monkeypatch, activations):
    tower = toy.make_tower(layers=3, width=16, random_state=0)
    theta0, tau, mask, threshold, blocks, inside, merge = _merge_setup(tower)
    made = []
    weight = BlockMerge.weight

    def tracked(self, key):
        w = weight(self, key)
        made.append(weakref.ref(w))
        return w

    monkeypatch.setattr(BlockMerge, "weight", tracked)
    patched = recompute_blocks(structure_copy(tower), blocks, activations=activations, merge=merge)
    state = {k: v for k, v in theta0.items() if k not in inside}
    z = encode(patched, state, torch.randn(4, 3, 8, 8))
    gc.collect()
    assert len(made) == len(inside)  # each block merged its own weights once in forward ...
    assert all(ref() is None for ref in made)  # ... and none is held until backward
    z.sum().backward()
    assert len(made) > len(inside)  # backward computed (some of) them again
    assert all(merge.scores[k].grad is not None for k in inside)

    # the same check fails when autograd keeps the merged tensors (no recipes): it measures something
    if not activations:
        made.clear()
        monkeypatch.setattr(BlockMerge, "recipes", lambda self, merged: contextlib.nullcontext())
        z = encode(patched, state, torch.randn(4, 3, 8, 8))
        gc.collect()
        assert any(ref() is not None for ref in made)
        del z


@pytest.mark.parametrize(
    ("batching", "micro", "ckpt", "precision"),
    [
        ("sequential", None, False, None),
        ("joint", None, False, None),
        ("joint", 7, False, None),
        ("sequential", None, True, None),
        ("joint", None, True, None),
        ("sequential", None, False, "bf16"),
    ],
)
def test_fit_merging_in_the_blocks_takes_the_same_steps(problem, batching, micro, ckpt, precision):
    pre, experts, heads, X = problem
    before = fingerprint_all(pre, experts, heads)
    kw = dict(SAME_STEP_FIT, task_batching=batching, micro_batch_size=micro, gradient_checkpointing=ckpt)
    kw.update(precision=precision)
    kept = MOMAMerger(pre, experts, heads, **kw).fit(X)
    calls = []
    weight = BlockMerge.weight

    def counted(self, key):
        calls.append(key)
        return weight(self, key)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(BlockMerge, "weight", counted)
        recomputed = MOMAMerger(pre, experts, heads, recompute_merged_weights=True, **kw).fit(X)
    assert calls  # the option did take effect
    assert_same_fit(kept, recomputed)
    # the mask moved away from its start, so equal masks compare learned masks
    start = MOMAMerger(pre, experts, heads, **{**kw, "n_steps": 0}).fit(X)
    assert any(not torch.equal(start.mask_[k], recomputed.mask_[k]) for k in start.mask_)
    assert fingerprint_all(pre, experts, heads) == before
    assert all("forward" not in m.__dict__ for m in pre.modules())


def test_option_is_ignored_without_a_mask(problem):
    pre, experts, heads, X = problem
    a = MOMAMerger(pre, experts, heads, learn_mask=False, n_steps=3, random_state=0).fit(X)
    b = MOMAMerger(pre, experts, heads, learn_mask=False, n_steps=3, random_state=0, recompute_merged_weights=True)
    b.fit(X)
    for t in a.rotations_:
        assert torch.equal(a.rotations_[t], b.rotations_[t])


def test_bad_values_are_rejected_before_any_work(problem):
    pre, experts, heads, X = problem
    calls = []
    lazy = counting_loaders(experts, calls)
    with pytest.raises(TypeError, match="recompute_merged_weights must be True or False, got 'yes'"):
        MOMAMerger(pre, lazy, heads, recompute_merged_weights="yes").fit(X)
    flat = FlatEncoder()
    flat_experts = {t: (lambda: copy.deepcopy(flat)) for t in experts}
    with pytest.raises(ValueError, match=r"recompute_merged_weights=True: the encoder \(FlatEncoder\) has no repeated"):
        MOMAMerger(flat, flat_experts, heads, recompute_merged_weights=True).fit(X)
    assert calls == []
    with pytest.raises(TypeError, match="recompute_merged_weights must be True or False"):
        recomputed_blocks(pre, False, 1)
    # named blocks serve both: checkpointing's classes choose where the weights are merged too
    assert recomputed_blocks(pre, nn.Linear, True)[1] == find_blocks(pre, nn.Linear)


class _Tied(nn.Module):
    """Uses a block's weight outside that block (as weight tying across modules would)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 12) for _ in range(2)])
        self.out = nn.Linear(12, 4)

    def forward(self, x):
        x = x.flatten(1)
        for b in self.blocks:
            x = torch.tanh(b(x))
        return self.out(x) + x[:, :4] @ self.blocks[0].weight[:4, :4]


def test_a_weight_used_outside_its_block_fails_loudly():
    torch.manual_seed(0)
    pre = _Tied()
    experts = {f"t{i}": copy.deepcopy(pre) for i in range(2)}
    for e in experts.values():
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    heads = {t: nn.Linear(4, 3) for t in experts}
    X = {t: torch.randn(10, 3, 2, 2) for t in experts}
    MOMAMerger(pre, experts, heads, n_steps=2).fit(X)  # fine with the merged weights kept
    for fraction in (0.0, 0.2):  # the error comes from the first step, or from the first evaluation
        merger = MOMAMerger(pre, experts, heads, n_steps=2, recompute_merged_weights=True, validation_fraction=fraction)
        with pytest.raises(RuntimeError, match="used a block's weights outside that block's forward"):
            merger.fit(X)


class _Peek(nn.Module):
    """Reads a block's weight through ``F.linear`` outside the block: on the CPU, torch 2.14 returns
    uninitialised memory for a meta weight there instead of raising.
    """

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 12) for _ in range(2)])
        self.blocks[0].weight.requires_grad_(False)  # frozen: no backward pass asks for its gradient

    def forward(self, x):
        x = x.flatten(1)
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x + nn.functional.linear(x, self.blocks[0].weight)


class _CrossTied(nn.Module):
    """One weight shared by two blocks (weight tying across blocks)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(12, 12) for _ in range(2)])
        self.blocks[1].weight = self.blocks[0].weight

    def forward(self, x):
        x = x.flatten(1)
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x


def _perturbed(pre, n=2):
    experts = {f"t{i}": copy.deepcopy(pre) for i in range(n)}
    for e in experts.values():
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return experts


def test_a_placeholder_read_that_torch_would_not_refuse_still_fails_loudly():
    torch.manual_seed(0)
    pre = _Peek()
    experts = _perturbed(pre)
    heads = {t: nn.Linear(12, 3) for t in experts}
    X = {t: torch.randn(10, 3, 2, 2) for t in experts}
    for kw in ({"validation_fraction": 0.0}, {"validation_fraction": 0.2}, {"rotation_init": "procrustes"}):
        merger = MOMAMerger(pre, experts, heads, n_steps=2, recompute_merged_weights=True, **kw)
        with pytest.raises(RuntimeError, match="used a block's weights outside that block's forward"):
            merger.fit(X)


def test_a_weight_shared_across_block_boundaries_is_refused_before_any_work():
    torch.manual_seed(0)
    pre = _CrossTied()
    calls = []
    lazy = counting_loaders(_perturbed(pre), calls)
    heads = {t: nn.Linear(12, 3) for t in lazy}
    X = {t: torch.randn(10, 3, 2, 2) for t in lazy}
    with pytest.raises(ValueError, match=r"the weight 'blocks.0.weight' is shared by \['blocks.0.weight', 'blocks.1.w"):
        MOMAMerger(pre, lazy, heads, recompute_merged_weights=True).fit(X)
    assert calls == []
    MOMAMerger(pre, lazy, heads, n_steps=1).fit(X)  # fine with the merged weights kept


def test_option_is_ignored_without_a_mask_even_where_it_could_not_apply():
    torch.manual_seed(0)
    flat = FlatEncoder()  # no repeated blocks: refused with a mask (see above)
    experts = _perturbed(flat)
    heads = {t: nn.Linear(6, 3) for t in experts}
    X = {t: torch.randn(10, 3, 2, 2) for t in experts}
    MOMAMerger(flat, experts, heads, learn_mask=False, recompute_merged_weights=True, n_steps=1).fit(X)


def test_parameter_survives_clone_and_save(problem, tmp_path):
    pre, experts, heads, X = problem
    merger = MOMAMerger(pre, experts, heads, n_steps=2, recompute_merged_weights=True).fit(X)
    assert clone(merger).recompute_merged_weights is True
    merger.save(tmp_path / "m.joblib")
    assert MOMAMerger.load(tmp_path / "m.joblib", pre, experts, heads).recompute_merged_weights is True


def test_recipes_leave_other_saved_tensors_alone():
    w = torch.randn(3, 3)
    bm = BlockMerge({}, {}, {}, 1.0, torch.tensor(0.0))
    x = torch.randn(2, 3, requires_grad=True)
    other = torch.randn(3, 3, requires_grad=True)
    with bm.recipes({"w": w}):
        y = x @ other  # neither is a merged tensor: saved as they are
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(2, 3) @ other.detach().T)
