"""Unusual but legitimate user models: token-id encoders, forwards that update buffers, parametrized
heads, tensors made under inference mode, module containers, mixed-dtype encoders, half precision.
"""

import copy

import numpy as np
import pytest
import torch
from conftest import module_fingerprint
from torch import nn

from momaestimator import MOMAMerger
from momaestimator.baselines import AdaMerging, HeadFineTuning, TaskArithmetic
from momaestimator.merging.mask import score_gradient


def _experts(pre, n_tasks=2, scale=0.05):
    out = {}
    for i in range(n_tasks):
        gen = torch.Generator().manual_seed(i + 1)
        e = copy.deepcopy(pre)
        with torch.no_grad():
            for p in e.parameters():
                if p.is_floating_point():
                    p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        out[f"t{i}"] = e
    return out


def _heads(tasks, dim=5, n_classes=3):
    torch.manual_seed(7)
    return {t: nn.Linear(dim, n_classes) for t in tasks}


class TokenEncoder(nn.Module):
    """A text-style encoder: integer token ids -> embedding -> mean pool -> linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.out = nn.Linear(8, 5)

    def forward(self, ids):
        return self.out(self.emb(ids).mean(1))


def test_an_encoder_of_integer_token_ids_fits_and_scores():
    torch.manual_seed(0)
    pre = TokenEncoder()
    experts = _experts(pre)
    heads = _heads(experts)
    gen = torch.Generator().manual_seed(0)
    ids = {t: torch.randint(0, 50, (12, 7), generator=gen) for t in experts}
    labels = {t: torch.randint(0, 3, (12,), generator=gen) for t in experts}
    merger = MOMAMerger(pre, experts, heads, n_steps=3, random_state=0).fit(ids)
    model = merger.transform()
    scores = merger.score_per_task({t: (ids[t], labels[t]) for t in ids})
    for t in ids:  # the ids reach the encoder as integers (as floats, nn.Embedding raises)
        expected = (model(ids[t], t).argmax(1) == labels[t]).float().mean().item()
        assert scores[t] == pytest.approx(expected)
    ta = TaskArithmetic(pre, experts, heads).fit()
    assert 0.0 <= ta.score({t: (ids[t], labels[t]) for t in ids}) <= 1.0


def test_uint8_inputs_still_become_the_encoder_dtype(problem):
    pre, experts, heads, data = problem
    x = {t: (v * 0).to(torch.uint8) for t, (v, _) in data.items()}
    merger = MOMAMerger(pre, experts, heads, n_steps=1, random_state=0).fit(x)
    assert merger.n_iter_ == 1


class CountingEncoder(nn.Module):
    """Updates a buffer in place in every forward, even in eval mode (like a quantization observer)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_max", torch.zeros(6))
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        self.calls += 1
        torch.maximum(self.running_max, x.detach().abs().amax(0), out=self.running_max)
        return self.lin(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda pre, ex, hd: MOMAMerger(pre, ex, hd, n_steps=2, random_state=0),
        lambda pre, ex, hd: AdaMerging(pre, ex, hd, n_steps=2, random_state=0),
        lambda pre, ex, hd: HeadFineTuning(pre, ex, hd, n_steps=2, random_state=0),
        lambda pre, ex, hd: TaskArithmetic(pre, ex, hd),
    ],
    ids=["moma", "adamerging", "head_finetuning", "task_arithmetic"],
)
def test_a_forward_that_updates_buffers_never_writes_into_the_users_modules(make):
    torch.manual_seed(0)
    pre = CountingEncoder().eval()
    experts = _experts(pre)
    heads = _heads(experts)
    x = {t: 3 * torch.randn(10, 6) for t in experts}
    before = [module_fingerprint(m) for m in (pre, *experts.values(), *heads.values())]
    est = make(pre, experts, heads).fit(x)
    est.score({t: (v, torch.zeros(10, dtype=torch.long)) for t, v in x.items()})
    after = [module_fingerprint(m) for m in (pre, *experts.values(), *heads.values())]
    assert after == before
    assert int(pre.calls) == 0 and float(pre.running_max.abs().sum()) == 0.0


def _weight_norm_heads(tasks, legacy):
    torch.manual_seed(3)
    wrap = nn.utils.weight_norm if legacy else nn.utils.parametrizations.weight_norm
    return {t: wrap(nn.Linear(5, 3)) for t in tasks}


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "legacy_hook"])
def test_weight_normalised_heads_merge_like_plain_heads_holding_their_weights(legacy):
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
    experts = _experts(pre, scale=0.3)
    wn = _weight_norm_heads(experts, legacy)
    plain = {}
    for t, h in wn.items():
        p = nn.Linear(5, 3)
        with torch.no_grad():
            p.weight.copy_(h.weight)
            p.bias.copy_(h.bias)
        plain[t] = p
    x = {t: torch.randn(12, 6, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(experts)}
    y = {t: (v, torch.arange(12) % 3) for t, v in x.items()}
    before = {t: module_fingerprint(h) for t, h in wn.items()}
    kw = dict(n_steps=4, rotation_lr=0.05, random_state=0)
    a = MOMAMerger(pre, experts, wn, **kw).fit(x)
    b = MOMAMerger(pre, experts, plain, **kw).fit(x)
    for t in x:
        torch.testing.assert_close(a.rotations_[t], b.rotations_[t])
    assert a.score_per_task(y) == b.score_per_task(y)
    za, zb = a.transform(), b.transform()
    for t in x:
        torch.testing.assert_close(za(x[t], t), zb(x[t], t))
    assert TaskArithmetic(pre, experts, wn).fit().score(y) == TaskArithmetic(pre, experts, plain).fit().score(y)
    # the user's heads are untouched and still work (their class is shared with any copy)
    assert {t: module_fingerprint(h) for t, h in wn.items()} == before
    for t, h in wn.items():
        torch.testing.assert_close(h(torch.ones(1, 5)), plain[t](torch.ones(1, 5)))


def test_heads_made_under_inference_mode_fit_like_ordinary_heads(problem, unlabeled):
    pre, experts, heads, _ = problem
    with torch.inference_mode():
        inf_heads = {t: copy.deepcopy(h) for t, h in heads.items()}
        for h in inf_heads.values():
            for name, p in list(h.named_parameters()):
                h.register_parameter(name, nn.Parameter(p.detach().clone(), requires_grad=False))
    assert all(p.is_inference() for h in inf_heads.values() for p in h.parameters())
    kw = dict(n_steps=3, rotation_lr=0.05, random_state=0)
    a = MOMAMerger(pre, experts, inf_heads, **kw).fit(unlabeled)
    b = MOMAMerger(pre, experts, heads, **kw).fit(unlabeled)
    for t in unlabeled:
        torch.testing.assert_close(a.rotations_[t], b.rotations_[t])
    AdaMerging(pre, experts, inf_heads, n_steps=1, random_state=0).fit(unlabeled)


class WithConstant(nn.Module):
    """A float32 encoder whose first state entry is a float64 constant buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("centre", torch.zeros(6, dtype=torch.float64))
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(x - self.centre.to(x.dtype))


def test_the_encoder_dtype_is_its_parameters_not_a_float64_buffer():
    torch.manual_seed(0)
    pre = WithConstant()
    experts = _experts(pre)
    heads = _heads(experts)
    x = {t: torch.randn(10, 6, dtype=torch.float64) for t in experts}
    y = {t: (v, torch.zeros(10, dtype=torch.long)) for t, v in x.items()}
    merger = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(x)
    assert merger.transform().encoder.lin.weight.dtype == torch.float32
    assert 0.0 <= merger.score(y) <= 1.0
    assert 0.0 <= TaskArithmetic(pre, experts, heads).fit().score(y) <= 1.0


def test_module_containers_are_accepted_as_the_task_dicts(problem, unlabeled):
    pre, experts, heads, _ = problem
    kw = dict(n_steps=2, random_state=0)
    ref = MOMAMerger(pre, experts, heads, **kw).fit(unlabeled)
    by_dict = MOMAMerger(pre, nn.ModuleDict(experts), nn.ModuleDict(heads), **kw).fit(unlabeled)
    assert by_dict.tasks_ == ref.tasks_
    for t in ref.tasks_:
        torch.testing.assert_close(by_dict.rotations_[t], ref.rotations_[t])
    by_list = MOMAMerger(pre, nn.ModuleList(experts.values()), nn.ModuleList(heads.values()), **kw)
    by_list.fit({str(i): x for i, x in enumerate(unlabeled.values())})
    assert by_list.tasks_ == ["0", "1", "2"]


def test_half_precision_mask_gradients_are_formed_in_float32():
    gen = torch.Generator().manual_seed(0)
    grad = (torch.randn(4096, generator=gen) * 1e-4).half()
    tau = (torch.randn(4096, generator=gen) * 1e-3).half()
    scores = torch.randn(4096, generator=gen)
    half = score_gradient(grad, scores, torch.tensor(0.0), tau, 1.0)
    full = score_gradient(grad.float(), scores, torch.tensor(0.0), tau.float(), 1.0)
    assert half.dtype == torch.float32
    assert (full != 0).float().mean() > 0.99
    assert (half != 0).float().mean() > 0.99  # in float16 the product 1e-7 underflows to 0
    torch.testing.assert_close(half, full)


@pytest.mark.parametrize("bad", ["abc", -1, 2**40, 1.5])
def test_a_bad_random_state_is_refused_before_reading_any_data(problem, bad):
    pre, experts, heads, data = problem
    reads = []

    X = {t: torch.utils.data.DataLoader(_Logged(x, reads), batch_size=4) for t, (x, _) in data.items()}
    for est in (
        MOMAMerger(pre, experts, heads, n_steps=1, random_state=bad),
        AdaMerging(pre, experts, heads, n_steps=1, random_state=bad),
        HeadFineTuning(pre, experts, heads, n_steps=1, random_state=bad),
    ):
        with pytest.raises(ValueError, match="random_state must be"):
            est.fit(X)
    assert reads == []
    assert MOMAMerger(pre, experts, heads, n_steps=1, random_state=np.random.RandomState(0)).fit(X).n_iter_ == 1


class _Logged(torch.utils.data.Dataset):
    def __init__(self, x, reads):
        self.x, self.reads = x, reads

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads.append(i)
        return self.x[i]


def test_a_head_reusing_its_first_linear_is_refused_for_what_it_is(problem, unlabeled):
    pre, experts, heads, _ = problem
    dim = next(iter(heads.values())).weight.shape[1]
    lin = nn.Linear(dim, dim)
    tied = {t: nn.Sequential(lin, nn.ReLU(), lin) for t in heads}
    with pytest.raises(ValueError, match=r"cannot absorb a rotation.*'0\.weight'"):
        MOMAMerger(pre, experts, tied, n_steps=1).fit(unlabeled)
    merger = MOMAMerger(pre, experts, tied, n_steps=1, learn_rotations=False, random_state=0).fit(unlabeled)
    assert merger.n_iter_ == 1


def test_integer_pixel_types_become_floats_and_index_types_get_a_clear_error(problem):
    pre, experts, heads, data = problem
    x16 = {t: (v * 10).to(torch.int16) for t, (v, _) in data.items()}
    assert MOMAMerger(pre, experts, heads, n_steps=1, random_state=0).fit(x16).n_iter_ == 1
    x64 = {t: v.to(torch.int64) for t, v in x16.items()}
    with pytest.raises(ValueError, match="int64, which reach the encoder as integers.*give them as floats or uint8"):
        MOMAMerger(pre, experts, heads, n_steps=1).fit(x64)
    with pytest.raises(ValueError, match="int64, which reach the encoder as integers"):
        TaskArithmetic(pre, experts, heads).fit().score({t: (x64[t], y) for t, (_, y) in data.items()})


@pytest.mark.filterwarnings("ignore:.*spectral_norm.*:FutureWarning")
def test_spectral_normalised_heads_become_plain_heads_that_load_a_plain_state_dict():
    torch.manual_seed(0)
    pre = nn.Sequential(nn.Linear(6, 5), nn.Tanh())
    experts = _experts(pre, scale=0.3)
    legacy = {t: nn.utils.spectral_norm(nn.Linear(5, 3)) for t in experts}
    modern = {t: nn.utils.parametrizations.spectral_norm(nn.Linear(5, 3)) for t in experts}  # in train mode
    x = {t: torch.randn(8, 6) for t in experts}
    for heads in (legacy, modern):
        expected = {t: h.eval()(torch.ones(2, 5)).detach() for t, h in heads.items()}
        for h in heads.values():
            h.train()
        model = MOMAMerger(pre, experts, heads, n_steps=0, learn_mask=False).fit(x).transform()
        model.load_state_dict(dict(model.state_dict()))  # no spectral-norm entries or hooks left over
        for t in heads:
            torch.testing.assert_close(model.heads[t](torch.ones(2, 5)), expected[t])
            torch.testing.assert_close(heads[t].eval()(torch.ones(2, 5)), expected[t])  # the user's head as it was


def test_the_public_rotation_helpers_take_parametrized_heads():
    from momaestimator.merging import absorb_heads, plain_head, rotation_mismatch

    head = nn.utils.parametrizations.weight_norm(nn.Linear(8, 3))
    before = module_fingerprint(head)
    assert rotation_mismatch(head) < 1e-12
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    z = torch.randn(4, 8)
    torch.testing.assert_close(absorb_heads({"a": head}, {"a": q})["a"](z), head(z @ q.T))
    assert sorted(plain_head(head).state_dict()) == ["bias", "weight"] and plain_head(head) is not head
    plain = nn.Linear(8, 3)
    assert plain_head(plain) is plain
    assert module_fingerprint(head) == before and type(head).__name__ == "ParametrizedLinear"


class PoolingCNN(nn.Module):
    """A convolutional encoder with global pooling: takes images of any size, always 5 features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.proj = nn.Linear(4, 5)

    def forward(self, x):
        return self.proj(torch.relu(self.conv(x)).mean((2, 3)))


def _two_sizes(n=12):
    gen = torch.Generator().manual_seed(0)
    return {"t0": torch.randn(n, 3, 8, 8, generator=gen), "t1": torch.randn(n, 3, 12, 12, generator=gen)}


@pytest.mark.parametrize(
    "kw",
    [
        {},  # the default, task_batching="sequential"
        {"task_batching": 1, "micro_batch_size": 5},  # one task per pass, cut: never mixes tasks
        {"validation_fraction": 0.25, "rotation_init": "procrustes"},  # held-out loss and start, per task
    ],
)
def test_tasks_whose_inputs_differ_in_shape_fit_one_task_per_pass(kw):
    torch.manual_seed(0)
    pre = PoolingCNN()
    experts = _experts(pre, scale=0.2)
    heads = _heads(experts)
    X = _two_sizes()
    before = [module_fingerprint(m) for m in (pre, *experts.values(), *heads.values())]
    m = MOMAMerger(pre, experts, heads, n_steps=30, sparsity=0.2, rotation_lr=0.01, random_state=0, **kw).fit(X)
    assert [module_fingerprint(m) for m in (pre, *experts.values(), *heads.values())] == before
    losses = [h["loss"] for h in m.history_]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    model = m.transform()
    with torch.no_grad():
        for t, x in X.items():  # each task's own inputs, each size
            assert model(x, t).shape == (len(x), 3)
            y = heads[t](experts[t](x)).argmax(1)  # the expert's labels
            assert 0.0 <= m.score({t: (x, y)}) <= 1.0


@pytest.mark.parametrize("batching", ["joint", 2])
def test_tasks_whose_inputs_differ_in_shape_are_refused_when_a_pass_would_mix_them(batching):
    pre = PoolingCNN()
    experts = _experts(pre)
    m = MOMAMerger(pre, experts, _heads(experts), n_steps=2, task_batching=batching)
    with pytest.raises(ValueError, match=r"X\['t1'\] has samples of shape \(3, 12, 12\).*task_batching='sequential'"):
        m.fit(_two_sizes())


def test_an_encoder_whose_feature_size_depends_on_the_input_shape_is_refused_before_any_expert_runs():
    class SizeDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 3, padding=1)

        def forward(self, x):
            return self.conv(x).flatten(1)[:, : x.shape[-1] * 2]  # 16 features at 8x8, 24 at 12x12

    pre = SizeDependent()
    experts = _experts(pre)
    calls = []
    for e in experts.values():
        e.register_forward_hook(lambda *a: calls.append(1))
    heads = {t: nn.Linear(16, 3) for t in experts}
    with pytest.raises(
        ValueError, match=r"different number of features for different tasks' inputs \(16 for X\['t0'\]"
    ):
        MOMAMerger(pre, experts, heads, n_steps=2).fit(_two_sizes())
    assert not calls
