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


class FlatEncoder(torch.nn.Module):
    """An encoder with no repeated blocks (one Linear on the flattened 3x2x2 input)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(12, 6)

    def forward(self, x):
        return self.body(x.flatten(1))


def counting_loaders(experts, calls):
    """Lazy expert loaders that append to ``calls`` when read (to show nothing was read)."""

    def loader(expert):
        def load():
            calls.append(1)
            return expert

        return load

    return {t: loader(e) for t, e in experts.items()}


# settings of the fits that compare two ways of taking the same steps (enough steps and held-out
# evaluations for the mask and the rotations to move)
SAME_STEP_FIT = dict(n_steps=6, sparsity=0.2, rotation_lr=0.01, validation_fraction=0.25, eval_every=2, random_state=0)


def assert_same_fit(a, b):
    """Two fitted MOMAMergers took the same steps: losses, held-out losses, mask, best step, rotations."""
    assert len(a.history_) == len(b.history_)
    for ha, hb in zip(a.history_, b.history_):
        assert ha["loss"] == pytest.approx(hb["loss"], rel=1e-5)
        assert ha.keys() == hb.keys()
        if "valid_loss" in ha:
            assert ha["valid_loss"] == pytest.approx(hb["valid_loss"], rel=1e-5)
    agree = sum(int((a.mask_[k] == b.mask_[k]).sum()) for k in a.mask_)
    assert agree / sum(m.numel() for m in a.mask_.values()) > 0.999
    assert a.best_step_ == b.best_step_
    for t in a.rotations_:
        assert torch.allclose(a.rotations_[t], b.rotations_[t], atol=1e-5)
