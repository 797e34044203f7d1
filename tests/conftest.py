import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import hashlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: one thread is as fast and avoids oversubscription on shared CI machines.
torch.set_num_threads(1)

from momaestimator import toy  # noqa: E402


@pytest.fixture(scope="session")
def problem():
    """A 3-task toy problem: (pretrained, experts, heads, {task: (x, y)})."""
    return toy.make_problem(n_tasks=3, random_state=0, finetune_steps=20)


@pytest.fixture(scope="session")
def unlabeled(problem):
    return {t: x for t, (x, _) in problem[3].items()}


def module_fingerprint(module: torch.nn.Module):
    """Everything about a module that must not change: values, dtype, device, requires_grad, flags."""
    out = {"training": [m.training for m in module.modules()]}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h = hashlib.sha256(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()
        out[name] = (h, t.dtype, t.device, t.requires_grad, t.grad is None, tuple(t.shape))
    return out


def fingerprint_all(pre, experts, heads):
    return (
        module_fingerprint(pre),
        {t: module_fingerprint(m) for t, m in experts.items()},
        {t: module_fingerprint(m) for t, m in heads.items()},
    )
