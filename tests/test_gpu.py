"""CUDA: fit/transform/score end to end, CPU/GPU parity of the absorbed model, user modules stay put.

Marked ``gpu``; skipped (and listed as skipped by ``-ra``) on machines without CUDA.
"""

import pytest
import torch
from conftest import fingerprint_all

from momaestimator import MOMAMerger

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_fit_matches_cpu_fit_and_leaves_user_modules_on_cpu(problem, unlabeled):
    pre, experts, heads, data = problem
    before = fingerprint_all(pre, experts, heads)
    kw = dict(n_steps=10, sparsity=0.2, rotation_lr=0.01, validation_fraction=0.0, random_state=0)
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
    assert 0.0 <= m.score(data) <= 1.0
