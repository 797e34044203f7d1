"""Base merges on small tensors: hand computations, edge cases, and FusionBench parity."""

import copy
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from momaestimator import LinearHead, MOMAMerger
from momaestimator.merging import multitask_vector, task_arithmetic, task_vector, ties_merging, weight_averaging
from momaestimator.merging.functional import absorb_heads


def sd(**tensors):
    return {k: torch.as_tensor(v, dtype=torch.float32) for k, v in tensors.items()}


PRE = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([[0.0, 0.0]]), "step": torch.tensor(7)}
FT1 = {"a": torch.tensor([2.0, 2.0, 0.0]), "b": torch.tensor([[1.0, -1.0]]), "step": torch.tensor(99)}
FT2 = {"a": torch.tensor([1.5, 0.0, 3.0]), "b": torch.tensor([[-3.0, -1.0]]), "step": torch.tensor(5)}


def test_task_vector_is_difference_of_float_entries():
    tv = task_vector(PRE, FT1)
    assert set(tv) == {"a", "b"}  # integer buffers never merged
    assert torch.equal(tv["a"], torch.tensor([1.0, 0.0, -3.0]))


def test_task_arithmetic_matches_hand_computation_and_keeps_integer_buffers():
    out = task_arithmetic(PRE, {"x": FT1, "y": FT2}, scaling=0.5)
    # τ1 = [1, 0, -3], τ2 = [0.5, -2, 0]; θ0 + 0.5 (τ1 + τ2)
    assert torch.allclose(out["a"], torch.tensor([1.75, 1.0, 1.5]))
    assert torch.allclose(out["b"], torch.tensor([[-1.0, -1.0]]))
    assert out["step"].item() == 7 and out["step"] is not PRE["step"]


def test_weight_averaging_matches_hand_computation():
    out = weight_averaging([FT1, FT2], pretrained=PRE)
    assert torch.allclose(out["a"], torch.tensor([1.75, 1.0, 1.5]))
    assert out["step"].item() == 7


def test_merges_do_not_modify_inputs():
    copies = [{k: v.clone() for k, v in d.items()} for d in (PRE, FT1, FT2)]
    task_arithmetic(PRE, [FT1, FT2])
    ties_merging(PRE, [FT1, FT2], top_k=0.5)
    weight_averaging([FT1, FT2])
    for d, c in zip((PRE, FT1, FT2), copies):
        assert all(torch.equal(d[k], c[k]) for k in d)


def test_ties_trims_elects_sign_and_merges_disjointly():
    pre = sd(w=[0.0, 0.0, 0.0, 0.0])
    # kthvalue boundary as the reference code: k = 4 - int(4 * 0.5) = 2nd smallest magnitude is kept,
    # so three entries per task survive (one more than top_k)
    t1 = sd(w=[4.0, -3.0, 0.5, 0.1])
    t2 = sd(w=[-1.0, -2.0, 2.0, 0.2])
    out = ties_merging(pre, [t1, t2], scaling=1.0, top_k=0.5, merge="sum")["w"]
    # trimmed t1 = [4, -3, 0.5, 0], t2 = [-1, -2, 2, 0]; elected signs [+, -, +, 0 -> majority +]
    # agreeing entries: [4, -3 - 2, 0.5 + 2, nothing]
    assert torch.allclose(out, torch.tensor([4.0, -5.0, 2.5, 0.0]))
    mean = ties_merging(pre, [t1, t2], scaling=1.0, top_k=0.5, merge="mean")["w"]
    assert torch.allclose(mean, torch.tensor([4.0, -2.5, 1.25, 0.0]))
    mx = ties_merging(pre, [t1, t2], scaling=1.0, top_k=0.5, merge="max")["w"]
    assert torch.allclose(mx, torch.tensor([4.0, -3.0, 2.0, 0.0]))


def test_ties_zero_mass_takes_majority_sign_and_opposite_entries_cancel():
    pre = sd(w=[0.0, 0.0, 0.0])
    t1 = sd(w=[1.0, 2.0, 1.0])
    t2 = sd(w=[1.0, 2.0, -1.0])  # third entry: mass 0 -> majority sign (+) -> only t1 agrees
    out = ties_merging(pre, [t1, t2], scaling=1.0, top_k=1.0, merge="sum")["w"]
    assert torch.allclose(out, torch.tensor([2.0, 4.0, 1.0]))


def test_ties_threshold_is_global_over_the_model_not_per_tensor():
    pre = sd(a=[0.0, 0.0], b=[0.0, 0.0])
    t1 = sd(a=[10.0, 9.0], b=[0.1, 0.2])
    out = ties_merging(pre, [t1], scaling=1.0, top_k=0.25, merge="sum")
    # 4 entries, k = 4 - 1 = 3rd smallest magnitude (9) -> keeps 10 and 9; tensor b entirely trimmed
    assert torch.equal(out["b"], torch.zeros(2))
    assert torch.equal(out["a"], torch.tensor([10.0, 9.0]))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="'b'"):
        task_arithmetic(PRE, [{"a": FT1["a"], "step": FT1["step"]}])
    with pytest.raises(ValueError, match="shape"):
        task_arithmetic(PRE, [{**FT1, "a": torch.zeros(4)}])
    with pytest.raises(TypeError, match="state dict"):
        task_arithmetic("not a model", [FT1])
    with pytest.raises(ValueError, match="top_k"):
        ties_merging(PRE, [FT1], top_k=0.0)
    with pytest.raises(ValueError, match="unknown base"):
        multitask_vector(PRE, [FT1], base="dare")
    with pytest.raises(ValueError, match="empty"):
        task_arithmetic(PRE, [])


def _fusionbench_ties_utils():
    """FusionBench's own TIES utilities (installed with --no-deps; its package __init__ needs hydra)."""
    spec = importlib.util.find_spec("fusion_bench")
    if spec is None:
        pytest.fail("fusion-bench is not installed: run the README's test command (pip install --no-deps fusion-bench)")
    path = Path(spec.submodule_search_locations[0]) / "method" / "ties_merging" / "ties_merging_utils.py"
    stub = types.ModuleType("fusion_bench.utils.type")
    stub.StateDictType = dict
    saved = {k: sys.modules.get(k) for k in ("fusion_bench", "fusion_bench.utils", "fusion_bench.utils.type")}
    sys.modules.update(
        {
            "fusion_bench": types.ModuleType("fusion_bench"),
            "fusion_bench.utils": types.ModuleType("fusion_bench.utils"),
            "fusion_bench.utils.type": stub,
        }
    )
    try:
        mod_spec = importlib.util.spec_from_file_location("_fb_ties_utils", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod


@pytest.mark.parametrize("merge", ["sum", "mean", "max"])
def test_ties_equals_fusionbench_on_toy_encoders(problem, merge, capsys):
    fb = _fusionbench_ties_utils()
    pre, experts, _, _ = problem
    pre_sd = pre.state_dict()
    fts = [m.state_dict() for m in experts.values()]
    ours = ties_merging(pre, experts, scaling=0.3, top_k=0.2, merge=merge)
    flat_pre = fb.state_dict_to_vector(pre_sd)
    flat_tv = torch.vstack([fb.state_dict_to_vector(ft) - flat_pre for ft in fts])
    merged = flat_pre + 0.3 * fb.ties_merging(flat_tv, reset_thresh=0.2, merge_func=merge)
    ref = fb.vector_to_state_dict(merged, pre_sd)
    for k in ref:
        assert torch.allclose(ours[k], ref[k], atol=1e-6, rtol=0), k


def test_task_arithmetic_equals_sum_of_task_vectors_on_toy_encoders(problem):
    pre, experts, _, _ = problem
    out = task_arithmetic(pre, experts, scaling=0.3)
    for k, v in pre.state_dict().items():
        expected = v + 0.3 * sum(m.state_dict()[k] - v for m in experts.values())
        assert torch.allclose(out[k], expected, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=6),
    batching=st.one_of(st.sampled_from(["joint", "sequential"]), st.integers(1, 7)),
    micro=st.one_of(st.none(), st.integers(1, 25)),
)
def test_pass_plan_covers_every_sample_once_within_its_task_group(sizes, batching, micro):
    from momaestimator.merging.fit import pass_plan, task_groups

    plan = pass_plan(sizes, batching, micro)
    group_of = {i: g for g, group in enumerate(task_groups(list(range(len(sizes))), batching)) for i in group}
    seen = {i: [] for i in range(len(sizes))}
    for segments in plan:
        assert segments, "empty pass"
        assert micro is None or sum(hi - lo for _, lo, hi in segments) <= micro
        assert len({group_of[i] for i, _, _ in segments}) == 1  # a pass never mixes task groups
        for i, lo, hi in segments:
            assert 0 <= lo < hi <= sizes[i]
            seen[i].extend(range(lo, hi))
    assert all(seen[i] == list(range(sizes[i])) for i in seen)  # each sample once, in order
    if micro is None:
        assert len(plan) == len(set(group_of.values()))
    else:  # as few passes as the cut allows: all but each group's last are full
        for g in set(group_of.values()):
            mine = [sum(hi - lo for _, lo, hi in p) for p in plan if group_of[p[0][0]] == g]
            assert all(n == micro for n in mine[:-1])


def test_absorbed_head_weight_is_rounded_once_from_the_exact_product():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=gen, dtype=torch.float64))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        head = LinearHead(torch.randn(5, 64, generator=gen).to(dtype))
        new = absorb_heads({"a": head}, {"a": q.float()})["a"]
        exact = (head.weight.detach().double() @ q.float().double()).to(dtype)
        assert new.weight.dtype == dtype and torch.equal(new.weight.detach(), exact)


def test_merged_state_dict_shares_no_tensor_with_the_users_encoder(problem, unlabeled):
    pre, experts, heads, _ = problem
    pre = copy.deepcopy(pre)
    pre.register_buffer("step", torch.tensor(3))  # an integer buffer: not merged, but copied
    experts = {t: copy.deepcopy(e) for t, e in experts.items()}
    for e in experts.values():
        e.register_buffer("step", torch.tensor(3))
    merger = MOMAMerger(pre, experts, heads, n_steps=1, random_state=0).fit(unlabeled)
    state = merger.merged_state_dict()
    state["step"] += 100
    assert int(pre.step) == 3
    ptrs = {v.data_ptr() for v in pre.state_dict().values()}
    assert not any(v.data_ptr() in ptrs for v in state.values())
