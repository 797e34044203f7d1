"""Bad input raises a clear error before any work, and leaves the user's objects untouched."""

import copy

import numpy as np
import open_clip
import pytest
import torch
from conftest import fingerprint_all
from torch import nn

from momaestimator import LinearHead, MOMAMerger, toy


@pytest.fixture()
def models(problem):
    pre, experts, heads, _ = problem
    return pre, experts, heads


def fit_raises(models, X, exc, match, **kw):
    pre, experts, heads = models
    before = fingerprint_all(pre, experts, heads)
    x_before = {t: v.clone() for t, v in X.items() if isinstance(v, torch.Tensor)}
    merger = MOMAMerger(pre, experts, heads, **{"n_steps": 2, **kw})
    with pytest.raises(exc, match=match):
        merger.fit(X)
    assert fingerprint_all(pre, experts, heads) == before
    assert all(X[t].numpy().tobytes() == v.numpy().tobytes() for t, v in x_before.items())
    assert not hasattr(merger, "mask_")


def test_task_keys_differ_between_encoders_and_heads(models, unlabeled):
    pre, experts, heads = models
    heads2 = {t: h for t, h in heads.items() if t != "task1"}
    with pytest.raises(ValueError, match=r"missing: \['task1'\]"):
        MOMAMerger(pre, experts, heads2).fit(unlabeled)


def test_task_keys_differ_between_models_and_data(models, unlabeled):
    X = {**{t: x for t, x in unlabeled.items() if t != "task2"}, "other": unlabeled["task2"]}
    fit_raises(models, X, ValueError, r"missing: \['task2'\], extra: \['other'\]")


def test_encoders_of_different_shapes(models, unlabeled):
    pre, experts, heads = models
    other = toy.make_tower(output_dim=6)
    with pytest.raises(ValueError, match=r"finetuned_encoders\['task0'\] differs in architecture: entry 'proj'"):
        MOMAMerger(pre, {**experts, "task0": other}, heads).fit(unlabeled)


def test_encoders_of_different_class(models, unlabeled):
    pre, experts, heads = models
    with pytest.raises(ValueError, match="share one architecture"):
        MOMAMerger(pre, {**experts, "task0": nn.Linear(2, 2)}, heads).fit(unlabeled)


def test_head_input_dim_differs_from_feature_dim(models, unlabeled):
    pre, experts, heads = models
    bad = {**heads, "task1": LinearHead(torch.randn(3, 5))}
    with pytest.raises(ValueError, match=r"heads\['task1'\] expects 5 input features but the encoder outputs 8"):
        MOMAMerger(pre, experts, bad).fit(unlabeled)


def test_unsupported_head(models, unlabeled):
    pre, experts, heads = models
    with pytest.raises(TypeError, match=r"heads\['task0'\] \(ReLU\) is not a supported head"):
        MOMAMerger(pre, experts, {**heads, "task0": nn.ReLU()}).fit(unlabeled)


def test_empty_task_data(models, unlabeled):
    fit_raises(models, {**unlabeled, "task1": torch.zeros(0, 3, 8, 8)}, ValueError, r"X\['task1'\] is empty")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_inputs(models, unlabeled, bad):
    x = unlabeled["task0"].clone()
    x[0, 0, 0, 0] = bad
    fit_raises(models, {**unlabeled, "task0": x}, ValueError, r"X\['task0'\] contains NaN or infinite")


@pytest.mark.parametrize("source", ["tensor", "array", "list"])
def test_non_finite_input_found_past_the_first_slice(source):
    from momaestimator.data import materialize_inputs

    x = torch.zeros(9, 4, 5)
    x[-1, 3, 4] = np.nan  # the very last entry, in the last slice the check reads
    src = {"tensor": x, "array": x.numpy(), "list": list(x)}[source]
    with pytest.raises(ValueError, match=r"X\['a'\] contains NaN"):
        materialize_inputs(src, task="a")
    # the sliced check itself: slices of 2 samples, NaN only in the fifth slice
    from momaestimator.data import _all_finite

    assert not _all_finite(x, chunk=40)
    assert _all_finite(x[:-1], chunk=40)


def test_tensor_and_array_inputs_are_read_in_place_not_copied():
    from momaestimator.data import materialize_inputs

    x = torch.randn(6, 3)
    assert materialize_inputs(x, task="a").data_ptr() == x.data_ptr()
    a = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    assert materialize_inputs(a, task="a").data_ptr() == a.__array_interface__["data"][0]
    # another dtype is converted (a copy), the original untouched
    d = x.double()
    out = materialize_inputs(d, task="a", dtype=torch.float32)
    assert out.dtype == torch.float32 and d.dtype == torch.float64
    assert torch.equal(out, x)


@pytest.mark.parametrize(
    ("param", "value", "exc", "match"),
    [
        ("sparsity", 1.0, ValueError, r"sparsity must be in \[0.0, 1.0\)"),
        ("sparsity", -0.1, ValueError, "sparsity must be in"),
        ("sparsity", "0.5", TypeError, "sparsity must be a number"),
        ("scaling", 0.0, ValueError, "scaling must be in"),
        ("scaling", float("nan"), ValueError, "scaling must be finite"),
        ("n_steps", -1, ValueError, "n_steps must be in"),
        ("n_steps", 2.5, TypeError, "n_steps must be an int"),
        ("lr", 0, ValueError, "lr must be in"),
        ("batch_size", 0, ValueError, "batch_size must be in"),
        ("base", "dare", ValueError, "unknown base 'dare'"),
        ("objective", "mse", ValueError, "unknown objective 'mse'"),
        ("device", "tpu", ValueError, "device"),
        ("precision", "int8", ValueError, "unknown precision"),
        ("cuda_graphs", "yes", TypeError, "cuda_graphs must be True or False"),
        ("micro_batch_size", 0, ValueError, r"micro_batch_size \(None or a positive int\) must be in \[1"),
        ("micro_batch_size", 2.0, TypeError, "micro_batch_size .* must be an int"),
        ("micro_batch_size", True, TypeError, "micro_batch_size .* must be an int"),
    ],
)
def test_out_of_range_parameters(models, unlabeled, param, value, exc, match):
    fit_raises(models, unlabeled, exc, match, **{param: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(models, unlabeled):
    fit_raises(models, unlabeled, ValueError, "CUDA is not available", device="cuda")


def test_wrong_container_types(models, unlabeled):
    pre, experts, heads = models
    with pytest.raises(TypeError, match="finetuned_encoders must be a dict"):
        MOMAMerger(pre, pre, heads).fit(unlabeled)
    with pytest.raises(TypeError, match="pretrained_encoder must be a torch.nn.Module"):
        MOMAMerger("ViT-B-32", experts, heads).fit(unlabeled)
    with pytest.raises(TypeError, match=r"heads\['task0'\] must be a torch.nn.Module"):
        MOMAMerger(pre, experts, {**heads, "task0": "head.pt"}).fit(unlabeled)
    with pytest.raises(TypeError, match="X must be a dict"):
        MOMAMerger(pre, experts, heads).fit(unlabeled["task0"])


def test_non_finite_weights(models, unlabeled):
    pre, experts, heads = models
    bad = copy.deepcopy(experts["task2"])
    with torch.no_grad():
        bad.proj[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"finetuned_encoders\['task2'\]: entry 'proj' contains NaN"):
        MOMAMerger(pre, {**experts, "task2": bad}, heads).fit(unlabeled)


def test_score_labels_of_wrong_length(problem):
    pre, experts, heads, data = problem
    X = {t: x for t, (x, _) in data.items()}
    merger = MOMAMerger(pre, experts, heads, n_steps=1, random_state=0).fit(X)
    y = {t: lab for t, (_, lab) in data.items()}
    y["task1"] = y["task1"][:-3]
    with pytest.raises(ValueError, match="task 'task1': 21 labels for 24 inputs"):
        merger.score(X, y)
    with pytest.raises(ValueError, match="has no labels"):
        merger.score(X)


def test_score_before_fit_raises_not_fitted(models, problem):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        MOMAMerger(*models).score(problem[3])


class _Returns(nn.Module):
    """An encoder whose forward returns ``wrap(features)``: a dict, or a 3-D tensor."""

    def __init__(self, wrap):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.wrap = wrap

    def forward(self, x):
        return self.wrap(self.lin(x))


@pytest.mark.parametrize(
    ("wrap", "error", "match"),
    [
        (lambda z: {"pooled": z}, TypeError, "must return a tensor of features .* got dict; wrap it"),
        (lambda z: z[:, None, :], ValueError, r"must return \(batch, features\), got shape \(1, 1, 3\)"),
    ],
)
def test_encoder_that_does_not_return_a_features_matrix(wrap, error, match):
    pre, experts = _Returns(wrap), {t: _Returns(wrap) for t in ("a", "b")}
    heads = {t: LinearHead(torch.randn(2, 3)) for t in experts}
    with pytest.raises(error, match=match):
        MOMAMerger(pre, experts, heads, n_steps=1).fit({t: torch.randn(6, 4) for t in experts})


def test_a_whole_clip_model_as_encoder_is_told_to_pass_its_image_tower():
    cfg = {
        "embed_dim": 8,
        "vision_cfg": {"image_size": 8, "layers": 1, "width": 16, "patch_size": 4, "head_width": 8},
        "text_cfg": {"context_length": 4, "vocab_size": 20, "width": 16, "heads": 2, "layers": 1},
    }
    pre = open_clip.CLIP(**cfg)
    experts = {t: open_clip.CLIP(**cfg) for t in ("a", "b")}
    heads = {t: LinearHead(torch.randn(2, 8)) for t in experts}
    with pytest.raises(
        TypeError, match=r"got tuple; this is a whole CLIP model: pass its image tower \(`model.visual`\)"
    ):
        MOMAMerger(pre, experts, heads, n_steps=1).fit({t: torch.randn(6, 3, 8, 8) for t in experts})


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_mps_device_without_mps_is_refused_before_any_work(models, unlabeled):
    fit_raises(models, unlabeled, ValueError, "device 'mps' was requested but MPS is not available", device="mps")


@pytest.mark.parametrize(
    ("dtype", "precision", "match"),
    [
        (
            torch.float64,
            "bf16",
            "precision='bf16' autocasts .* but the encoder holds float64 weights; use precision=None$",
        ),
        (torch.float16, "bf16", "encoder holds float16 weights; use precision=None or the precision of those weights"),
        (torch.bfloat16, "fp16", "encoder holds bfloat16 weights"),
    ],
)
def test_a_precision_that_cannot_apply_to_the_encoder_is_refused(dtype, precision, match):
    pre, experts, heads, data = toy.make_problem(n_tasks=2)
    pre, experts = pre.to(dtype), {t: e.to(dtype) for t, e in experts.items()}
    heads = {t: h.to(dtype) for t, h in heads.items()}
    loaded = []
    lazy = {t: (lambda e=e: loaded.append(1) or e.state_dict()) for t, e in experts.items()}
    with pytest.raises(ValueError, match=match):
        MOMAMerger(pre, lazy, heads, n_steps=1, precision=precision).fit({t: x for t, (x, _) in data.items()})
    assert not loaded  # before any expert is read


def test_an_open_clip_low_precision_encoder_fits_and_scores_with_its_precision():
    from open_clip.model import convert_weights_to_lp

    def low_precision(module):  # as open_clip.create_model(precision="bf16"): bf16 matmul weights, fp32 norms
        module = copy.deepcopy(module)
        convert_weights_to_lp(module, torch.bfloat16)
        return module

    pre, experts, heads, data = toy.make_problem(n_tasks=2)
    lp = {t: low_precision(e) for t, e in experts.items()}
    pre_lp = low_precision(pre)
    x = {t: v for t, (v, _) in data.items()}
    with pytest.raises(ValueError, match="its weights mix float32 and half precision: .* precision='bf16'"):
        MOMAMerger(pre_lp, lp, heads, n_steps=1).fit(x)
    merger = MOMAMerger(pre_lp, lp, heads, n_steps=2, precision="bf16", random_state=0).fit(x)
    model = merger.transform()
    assert {k: v.dtype for k, v in model.encoder.state_dict().items()} == {
        k: v.dtype for k, v in pre_lp.state_dict().items()
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = {
            t: float((model(v, t).argmax(-1) == torch.as_tensor(y)).float().mean()) for t, (v, y) in data.items()
        }
    assert merger.score_per_task(data) == pytest.approx(expected)


# ---------------------------------------------------------------- the lower-level public helpers
@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"micro_batch_size": 0}, "micro_batch_size must be an int >= 1"),
        ({"rotation_init": "procrustess"}, "rotation_init must be one of"),
        ({"objective": "mse"}, "objective must be one of"),
        ({"batch_size": 0}, "batch_size must be an int >= 1"),
        ({"task_batching": "foo"}, "task_batching must be"),
        ({"task_batching": 0}, "task_batching must be"),
        ({"sparsity": 1.0}, r"sparsity must be in \[0.0, 1.0\)"),
    ],
)
def test_fit_config_and_pass_plans_refuse_bad_settings(kw, match):
    from momaestimator.merging import FitConfig
    from momaestimator.merging.fit import pass_plan, task_groups

    with pytest.raises(ValueError, match=match):
        FitConfig(**kw)
    assert FitConfig(n_steps=np.int64(3), task_batching=np.int64(2), sparsity=np.float64(0.2)).n_steps == 3
    with pytest.raises(ValueError, match="micro_batch_size must be an int >= 1"):
        pass_plan([4, 4], "sequential", 0)  # looped forever
    with pytest.raises(ValueError, match="task_batching must be"):
        task_groups(["a", "b"], "foo")


def test_merges_refuse_two_keys_that_name_one_task_and_average_half_models_exactly():
    from momaestimator.merging import multitask_vector, task_arithmetic, ties_merging, weight_averaging

    pre = {"w": torch.zeros(2)}
    experts = {0: {"w": torch.tensor([1.0, 1.0])}, "0": {"w": torch.tensor([3.0, -1.0])}}
    for merge in (
        lambda: task_arithmetic(pre, experts),
        lambda: ties_merging(pre, experts),
        lambda: multitask_vector(pre, experts),
        lambda: weight_averaging(experts),
    ):
        with pytest.raises(ValueError, match="which name the same task '0'"):
            merge()
    big = [{"w": torch.tensor([40000.0], dtype=torch.float16)}] * 2  # their fp16 sum overflows
    assert torch.equal(weight_averaging(big)["w"], torch.tensor([40000.0], dtype=torch.float16))
    gen = torch.Generator().manual_seed(0)
    bf16 = [{"w": torch.randn(1000, generator=gen).bfloat16()} for _ in range(8)]
    exact = (sum(m["w"].double() for m in bf16) / 8).bfloat16()
    assert torch.equal(weight_averaging(bf16)["w"], exact)


def test_misalignment_report_checks_labels_and_inputs(problem):
    from momaestimator.analysis import misalignment_report

    pre, experts, heads, data = problem
    cases = [
        ({t: (x, y.float() + 0.5) for t, (x, y) in data.items()}, "labels must be whole class indices"),
        ({t: (x, y + 100) for t, (x, y) in data.items()}, "label 10\\d is not a class of its head"),
        ({t: (x, y[:5]) for t, (x, y) in data.items()}, "5 labels for"),
        ({t: (torch.full_like(x, float("nan")), y) for t, (x, y) in data.items()}, "contains NaN"),
        ({t: (x[:, :2], y) for t, (x, y) in data.items()}, "the encoder cannot take inputs of shape"),
    ]
    for X, match in cases:
        with pytest.raises(ValueError, match=match):
            misalignment_report(pre, experts, heads, X)


def test_score_adam_and_batch_iteration_check_their_inputs():
    from momaestimator.data import iter_task_batches
    from momaestimator.merging import ScoreAdam

    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match=r"gradient of score tensor 0 is torch.float32 \(2,\)"):
        ScoreAdam([p], lr=0.1).step([0], [torch.ones(2)])  # read past the end of the buffer before
    assert torch.equal(p, torch.zeros(4))
    x = torch.zeros(5, 2)
    for labels in (np.arange(2), np.arange(7)):
        with pytest.raises(ValueError, match=f"{len(labels)} labels for the 5 samples"):
            list(iter_task_batches(x, labels, batch_size=3))
    for size in (0, -1, 2.5):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            list(iter_task_batches(x, batch_size=size))


def test_task_samples_models_and_toy_refuse_what_they_cannot_use(problem):
    from momaestimator import MergedModel, TaskSamples

    x = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"labels\['a'\] has shape \(4, 2\); expected one class index per input"):
        TaskSamples.from_arrays({"a": x}, {"a": np.eye(2)[[0, 1, 0, 1]]})  # one-hot
    ts = TaskSamples.from_arrays({"a": x}, {"a": torch.tensor([0, 1, 0, 1], dtype=torch.bfloat16)})
    assert ts.targets().tolist() == [0, 1, 0, 1]
    with pytest.raises(TypeError, match="weight must be a floating-point tensor, got torch.int64"):
        LinearHead(torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="normalize must be a bool, got 'False'"):
        LinearHead(torch.ones(2, 3), normalize="False")
    pre, _, heads, data = problem
    model = MergedModel(pre, {0: heads["task0"]})  # a task given as 0 is served as "0"
    x0 = data["task0"][0][:2]
    assert torch.equal(model(x0, 0), model(x0, "0"))
    assert torch.equal(MergedModel(pre, [("task0", heads["task0"])])(x0, "task0"), model(x0, 0))  # pairs
    with pytest.raises(ValueError, match="n_samples=2 < n_classes=3"):
        toy.make_problem(n_tasks=1, n_samples=2)
    assert len(toy.make_problem(n_tasks=1, random_state=None)[1]) == 1


def test_mask_rotations_and_objectives_refuse_degenerate_settings():
    from momaestimator.merging import GlobalMask, Rotations, kl_to_teacher

    for sparsity in (1.5, -0.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity must be a number in"):
            GlobalMask({"w": torch.ones(3)}, sparsity)
    with pytest.raises(ValueError, match="multi-task vector is empty"):
        GlobalMask({}, 0.1)
    with pytest.raises(ValueError, match="at least one task"):
        Rotations(0, 3)
    rotations = Rotations(2, 3)
    base = torch.linalg.qr(torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0)))[0]
    base[:, :, 0] *= torch.linalg.det(base).sign()[:, None]  # proper rotations
    rotations.set_base(base)
    fresh = Rotations(2, 3)
    fresh.load_state_dict({k: v.float() for k, v in rotations.state_dict().items()})  # "Unexpected key 'base'" before
    assert fresh.base.dtype == torch.float64  # as set_base keeps it
    assert torch.allclose(fresh.matrices(), rotations.matrices())
    with pytest.raises(ValueError, match=r"student logits \(4, 3\) and teacher logits \(1, 3\) differ"):
        kl_to_teacher(torch.zeros(4, 3), torch.zeros(1, 3))


def test_out_of_memory_in_the_encoder_is_not_blamed_on_the_inputs(problem, monkeypatch):
    from momaestimator.analysis import misalignment_report
    from momaestimator.baselines import TaskArithmetic

    pre, experts, heads, data = problem
    merger = TaskArithmetic(pre, experts, heads).fit()

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(type(pre), "forward", oom)
    for call in (
        lambda: merger.score(data),
        lambda: misalignment_report(pre, experts, heads, data),
        lambda: MOMAMerger(pre, experts, heads, n_steps=1).fit({t: x for t, (x, _) in data.items()}),
    ):
        with pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
            call()
