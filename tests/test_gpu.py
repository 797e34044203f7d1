"""CUDA: fit/transform/score end to end, CPU/GPU parity of the absorbed model, user modules stay put.

Marked ``gpu``; skipped (and listed as skipped by ``-ra``) on machines without CUDA.
"""

import copy

import pytest
import torch
from conftest import fingerprint_all

from momaestimator import MOMAMerger

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("rotation_init", ["identity", "procrustes"])
def test_cuda_fit_matches_cpu_fit_and_leaves_user_modules_on_cpu(problem, unlabeled, rotation_init):
    pre, experts, heads, data = problem
    before = fingerprint_all(pre, experts, heads)
    kw = dict(
        n_steps=10, sparsity=0.2, rotation_lr=0.01, validation_fraction=0.0, random_state=0, rotation_init=rotation_init
    )
    cpu = MOMAMerger(pre, experts, heads, device="cpu", **kw).fit(unlabeled)
    gpu = MOMAMerger(pre, experts, heads, device="cuda", **kw).fit(unlabeled)
    assert fingerprint_all(pre, experts, heads) == before  # nothing moved to the GPU
    # float reductions differ between devices: compare the learned state loosely, the models tightly
    agree = sum(int((cpu.mask_[k] == gpu.mask_[k]).sum()) for k in cpu.mask_)
    total = sum(m.numel() for m in cpu.mask_.values())
    assert agree / total > 0.99
    for t in cpu.rotations_:
        assert torch.allclose(cpu.rotations_[t], gpu.rotations_[t], atol=1e-3)
    model_gpu = gpu.transform()
    assert next(model_gpu.parameters()).device.type == "cpu"  # returned where the user's encoder lives
    x, _ = data["task0"]
    with torch.no_grad():
        on_gpu = model_gpu.cuda()(x.cuda(), "task0").cpu()
        on_cpu = gpu.transform()(x, "task0")
    assert torch.allclose(on_gpu, on_cpu, rtol=1e-4, atol=1e-4)
    assert gpu.score(data) == pytest.approx(cpu.score(data), abs=0.1)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_fit_runs_and_keeps_fp32_state(problem, unlabeled, precision):
    pre, experts, heads, data = problem
    m = MOMAMerger(pre, experts, heads, n_steps=5, precision=precision, device="cuda", random_state=0)
    m.fit(unlabeled)
    assert all(q.dtype == torch.float32 for q in m.rotations_.values())
    assert all(p.dtype == torch.float32 for p in m.transform().parameters())  # autocast is fit-time only
    full = MOMAMerger(pre, experts, heads, n_steps=5, device="cuda", random_state=0).fit(unlabeled)
    assert m.score(data) == pytest.approx(full.score(data), abs=0.15)


@pytest.mark.parametrize("experts_on", ["cuda", "cpu"])
def test_user_modules_on_cuda_stay_there_and_the_merged_model_is_returned_there(problem, unlabeled, experts_on):
    pre, experts, heads, data = problem
    pre_c = copy.deepcopy(pre).cuda()
    experts_c = {t: copy.deepcopy(m).to(experts_on) for t, m in experts.items()}  # experts may stay on the CPU
    heads_c = {t: copy.deepcopy(h).cuda() for t, h in heads.items()}
    before = fingerprint_all(pre_c, experts_c, heads_c)
    kw = dict(n_steps=10, sparsity=0.2, validation_fraction=0.0, random_state=0)
    on_gpu = MOMAMerger(pre_c, experts_c, heads_c, device="cuda", **kw).fit(unlabeled)  # CPU inputs are moved
    assert fingerprint_all(pre_c, experts_c, heads_c) == before
    model = on_gpu.transform()
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    on_cpu = MOMAMerger(pre, experts, heads, device="cpu", **kw).fit(unlabeled)
    x, _ = data["task1"]
    with torch.no_grad():
        a = model(x.cuda(), "task1").cpu()
        b = on_cpu.transform()(x, "task1")
    # the two fits may differ in a few mask entries (float reductions differ between devices)
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.95
    assert on_gpu.score({t: (xy[0].cuda(), xy[1].cuda()) for t, xy in data.items()}) == pytest.approx(
        on_cpu.score(data), abs=0.1
    )


@pytest.mark.parametrize("batching", ["joint", "sequential", 2])
def test_task_batchings_agree_on_cuda(problem, unlabeled, batching):
    pre, experts, heads, _ = problem
    kw = dict(n_steps=6, sparsity=0.2, rotation_lr=0.01, validation_fraction=0.0, random_state=0, device="cuda")
    ref = MOMAMerger(pre, experts, heads, task_batching="joint", **kw).fit(unlabeled)
    other = MOMAMerger(pre, experts, heads, task_batching=batching, **kw).fit(unlabeled)
    for a, b in zip(ref.history_, other.history_):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    agree = sum(int((ref.mask_[k] == other.mask_[k]).sum()) for k in ref.mask_)
    assert agree / sum(m.numel() for m in ref.mask_.values()) > 0.99


def test_host_inputs_reach_the_gpu_one_batch_at_a_time(problem):
    pre, experts, heads, data = problem
    # many samples per task, in host memory: the device must never hold them all
    big = {t: x.repeat(400, *([1] * (x.ndim - 1))) for t, (x, _) in data.items()}
    x_bytes = sum(x.numel() * x.element_size() for x in big.values())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    m = MOMAMerger(pre, experts, heads, n_steps=2, validation_fraction=0.1, device="cuda", random_state=0).fit(big)
    peak = torch.cuda.max_memory_allocated() - base
    assert all(x.device.type == "cpu" for x in big.values())
    assert peak < 0.25 * x_bytes, (peak, x_bytes)
    assert m.n_iter_ == 2 and set(m.rotations_) == set(big)


def test_mask_threshold_and_merge_on_cuda_equal_cpu():
    from momaestimator.merging import GlobalMask, masked_merge

    gen = torch.Generator().manual_seed(0)
    tau = {"a": torch.randn(3_000_000, generator=gen), "b": torch.randn(1500, 1000, generator=gen)}  # sampled cut
    theta0 = {k: torch.randn(v.shape, generator=gen) for k, v in tau.items()}
    masks = {
        dev: GlobalMask({k: v.to(dev) for k, v in tau.items()}, 0.3, generator=torch.Generator().manual_seed(1))
        for dev in ("cpu", "cuda")
    }
    with torch.no_grad():  # the same scores on both (log may round differently on the two devices)
        for s_gpu, s_cpu in zip(masks["cuda"].scores, masks["cpu"].scores):
            s_gpu.copy_(s_cpu)
    assert masks["cpu"]._sample is not None
    thr_cpu, thr_gpu = masks["cpu"].threshold(), masks["cuda"].threshold()
    assert float(thr_cpu) == float(thr_gpu)
    out = {k: torch.empty_like(v, device="cuda") for k, v in tau.items()}
    masks["cuda"].merge_into(out, {k: v.cuda() for k, v in theta0.items()}, {k: v.cuda() for k, v in tau.items()}, 0.3)
    for k in tau:
        keep = masks["cpu"].scores[list(tau).index(k)].detach() > thr_cpu
        assert torch.equal(out[k].cpu(), masked_merge(theta0[k], tau[k], keep, 0.3))
    b_cpu, b_gpu = masks["cpu"].binary(), masks["cuda"].binary()
    assert all(torch.equal(b_cpu[k], b_gpu[k].cpu()) for k in tau)


@pytest.mark.parametrize(
    ("batching", "micro", "ckpt", "remerge"),
    [
        ("sequential", None, False, False),
        ("joint", None, False, False),
        ("joint", 7, False, False),  # 7: passes spanning tasks, two pass shapes
        ("sequential", None, True, False),  # the backward graph holds the blocks' recomputation
        ("joint", None, True, False),  # ... and the score steps inside backward (one pass)
        ("sequential", None, False, True),  # merged weights made in the blocks, again in backward
        ("joint", None, True, True),  # ... inside the checkpointed recomputation, steps in backward
    ],
)
def test_cuda_graph_replay_takes_the_eager_steps(problem, unlabeled, batching, micro, ckpt, remerge):
    pre, experts, heads, _ = problem
    kw = dict(
        n_steps=8, sparsity=0.2, rotation_lr=0.01, validation_fraction=0.25, eval_every=3, random_state=0, device="cuda"
    )
    kw.update(task_batching=batching, micro_batch_size=micro, gradient_checkpointing=ckpt)
    eager = MOMAMerger(pre, experts, heads, cuda_graphs=False, **kw).fit(unlabeled)
    graphed = MOMAMerger(pre, experts, heads, recompute_merged_weights=remerge, **kw).fit(unlabeled)
    # two eager warm-up steps, then every step replays the captured passes
    assert [h["graphed"] for h in graphed.history_] == [False, False] + [True] * 6
    assert not any(h["graphed"] for h in eager.history_)
    for a, b in zip(eager.history_, graphed.history_):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a.get("valid_loss") == pytest.approx(b.get("valid_loss"), rel=1e-5)
    agree = sum(int((eager.mask_[k] == graphed.mask_[k]).sum()) for k in eager.mask_)
    assert agree / sum(m.numel() for m in eager.mask_.values()) > 0.999
    assert eager.best_step_ == graphed.best_step_
    for t in eager.rotations_:
        assert torch.allclose(eager.rotations_[t], graphed.rotations_[t], atol=1e-5)


class _HostSyncingEncoder(torch.nn.Module):
    """Wraps an encoder with a host synchronisation in its forward: cannot be graph-captured."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        z = self.inner(x)
        if bool(torch.isnan(z).any()):  # a device-to-host read
            raise ValueError("nan features")
        return z


def test_cuda_graph_capture_failure_falls_back_to_eager(problem, unlabeled):
    pre, experts, heads, _ = problem
    pre_s = _HostSyncingEncoder(copy.deepcopy(pre))
    experts_s = {t: _HostSyncingEncoder(copy.deepcopy(e)) for t, e in experts.items()}
    kw = dict(n_steps=5, sparsity=0.2, validation_fraction=0.0, random_state=0, device="cuda")
    eager = MOMAMerger(pre_s, experts_s, heads, cuda_graphs=False, **kw).fit(unlabeled)
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        fallback = MOMAMerger(pre_s, experts_s, heads, **kw).fit(unlabeled)
    assert not any(h["graphed"] for h in fallback.history_)
    assert [h["loss"] for h in fallback.history_] == pytest.approx([h["loss"] for h in eager.history_], rel=1e-5)
    # the device is usable after the failed capture
    assert torch.cuda.is_available() and float(torch.ones(2, device="cuda").sum()) == 2.0


@pytest.mark.parametrize("name", ["RepresentationSurgery", "HeadFineTuning"])
def test_baselines_fitted_on_cuda_models_return_a_model_that_runs_there(problem, unlabeled, name):
    import momaestimator.baselines as B

    pre, experts, heads, data = problem
    on = [copy.deepcopy(m).cuda() for m in (pre, *experts.values(), *heads.values())]
    pre_c, experts_c = on[0], dict(zip(experts, on[1 : 1 + len(experts)]))
    heads_c = dict(zip(heads, on[1 + len(experts) :]))
    kw = {"n_steps": 3, "random_state": 0, "device": "cuda"}
    merger = getattr(B, name)(pre_c, experts_c, heads_c, **kw).fit(unlabeled)
    model = merger.transform()
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    x, _ = data["task0"]
    with torch.no_grad():
        on_gpu = model(x.cuda(), "task0").cpu()
    cpu = getattr(B, name)(pre, experts, heads, **{**kw, "device": "cpu"}).fit(unlabeled)
    with torch.no_grad():
        assert torch.allclose(on_gpu, cpu.transform()(x, "task0"), rtol=1e-3, atol=1e-3)


def test_misalignment_report_on_cuda_models_matches_the_cpu_one(problem):
    from momaestimator.analysis import misalignment_report

    pre, experts, heads, data = problem
    on = [copy.deepcopy(m).cuda() for m in (pre, *experts.values(), *heads.values())]
    pre_c, experts_c = on[0], dict(zip(experts, on[1 : 1 + len(experts)]))
    heads_c = dict(zip(heads, on[1 + len(experts) :]))
    gpu = misalignment_report(pre_c, experts_c, heads_c, data)
    cpu = misalignment_report(pre, experts, heads, data)
    for a, b in zip(gpu, cpu):
        assert a["task"] == b["task"] and a["agreement_merged"] == pytest.approx(b["agreement_merged"], abs=0.05)
