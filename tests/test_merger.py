"""MOMAMerger: absorption is exact, adds nothing, leaves the user's modules alone, and learns."""

import copy

import numpy as np
import pytest
import torch
from conftest import fingerprint_all
from sklearn.base import clone
from torch import nn

from momaestimator import LinearHead, MergedModel, MOMAMerger, toy
from momaestimator.merging.fit import HeadSpec, merged_state, moma_logits
from momaestimator.merging.functional import structure_copy
from momaestimator.merging.task_arithmetic import multitask_vector


def fit_time_logits(merger, x, task):
    """The fit-time forward (masked merge, rotation, original head), recomputed from the fitted state."""
    pre = merger.pretrained_encoder
    theta0 = {k: v.detach() for k, v in pre.state_dict().items()}
    tau = multitask_vector(pre, merger.finetuned_encoders, base=merger.base, top_k=merger.top_k)
    theta = merged_state(theta0, tau, merger.mask_, merger.scaling)
    head = merger.heads[task]
    spec = HeadSpec(structure_copy(head), {k: v.detach() for k, v in head.state_dict().items()})
    logits, _ = moma_logits(structure_copy(pre), theta, spec, merger.rotations_[task], x)
    return logits


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("normalize", [True, False])
def test_absorption_is_exact_in_float64(normalize):
    pre, experts, heads, data = toy.make_problem(n_tasks=2, normalize=normalize, random_state=1)
    pre, experts = pre.double(), {t: m.double() for t, m in experts.items()}
    heads = {t: h.double() for t, h in heads.items()}
    X = {t: x.double() for t, (x, _) in data.items()}
    merger = MOMAMerger(pre, experts, heads, n_steps=15, sparsity=0.2, rotation_lr=0.05, random_state=0).fit(X)
    assert any(not torch.allclose(q, torch.eye(8, dtype=q.dtype)) for q in merger.rotations_.values())
    model = merger.transform()
    for t, x in X.items():
        with torch.no_grad():
            absorbed = model(x, t)
            expected = fit_time_logits(merger, x, t)
        assert absorbed.dtype == torch.float64
        assert torch.allclose(absorbed, expected, atol=1e-9, rtol=0), (absorbed - expected).abs().max()


@pytest.mark.parametrize(
    "make_head",
    [
        lambda w: LinearHead(w, normalize=True),
        lambda w: LinearHead(w, normalize=False),
        lambda w: nn.Linear(w.shape[1], w.shape[0]),
        lambda w: nn.Sequential(nn.Linear(w.shape[1], 5), nn.ReLU(), nn.Linear(5, w.shape[0])),
    ],
    ids=["normalizing", "linear-head", "nn.Linear", "sequential"],
)
def test_absorption_matches_fit_time_forward_in_float32(problem, unlabeled, make_head):
    pre, experts, heads, _ = problem
    torch.manual_seed(0)
    heads = {t: make_head(h.weight.detach()) for t, h in heads.items()}
    merger = MOMAMerger(pre, experts, heads, n_steps=10, rotation_lr=0.05, random_state=0).fit(unlabeled)
    model = merger.transform()
    for t, x in unlabeled.items():
        with torch.no_grad():
            absorbed, expected = model(x, t), fit_time_logits(merger, x, t)
        scale = expected.abs().max()
        assert ((absorbed - expected).abs().max() / scale) < 1e-5


def test_zero_additional_parameters_and_identical_shapes(problem, unlabeled):
    pre, experts, heads, _ = problem
    model = MOMAMerger(pre, experts, heads, n_steps=3, random_state=0).fit(unlabeled).transform()
    assert isinstance(model, MergedModel)
    assert type(model.encoder) is type(pre)
    assert n_params(model) == n_params(pre) + sum(n_params(h) for h in heads.values())
    assert {k: v.shape for k, v in model.encoder.state_dict().items()} == {
        k: v.shape for k, v in pre.state_dict().items()
    }
    for t, h in heads.items():
        assert type(model.heads[t]) is type(h)
        assert {k: v.shape for k, v in model.heads[t].state_dict().items()} == {
            k: v.shape for k, v in h.state_dict().items()
        }


@pytest.mark.parametrize("rotation_map", ["exp", "cayley"])
def test_rotations_are_orthogonal_and_mask_sparsity_is_exact(problem, unlabeled, rotation_map):
    pre, experts, heads, _ = problem
    merger = MOMAMerger(
        pre, experts, heads, n_steps=20, sparsity=0.37, rotation_lr=0.05, rotation_map=rotation_map, random_state=0
    ).fit(unlabeled)
    for q in merger.rotations_.values():
        assert torch.allclose(q @ q.T, torch.eye(q.shape[0]), atol=1e-5)
        assert torch.linalg.det(q).item() == pytest.approx(1.0, abs=1e-4)  # a rotation, not a reflection
    n_total = sum(m.numel() for m in merger.mask_.values())
    n_removed = sum(int((~m).sum()) for m in merger.mask_.values())
    assert n_removed == round(0.37 * n_total)
    assert set(merger.mask_) == {k for k, v in pre.state_dict().items() if v.is_floating_point()}


def test_user_modules_are_bit_identical_after_fit_transform_score(problem):
    pre, experts, heads, data = problem
    before = fingerprint_all(pre, experts, heads)
    X = {t: x for t, (x, _) in data.items()}
    merger = MOMAMerger(pre, experts, heads, n_steps=5, random_state=0).fit(X)
    merger.transform()
    merger.score(data)
    assert fingerprint_all(pre, experts, heads) == before


def test_user_module_in_train_mode_is_evaluated_in_eval_mode_and_left_in_train_mode():
    pre, experts, heads, data = toy.make_problem(n_tasks=2, random_state=3)
    pre = copy.deepcopy(pre).train()
    X = {t: x for t, (x, _) in data.items()}
    a = MOMAMerger(pre, experts, heads, n_steps=3, random_state=0).fit(X)
    assert pre.training
    assert all(not m.training for m in a.transform().modules())


def kl_of(model, experts, heads, X):
    total = 0.0
    with torch.no_grad():
        for t, x in X.items():
            teacher = torch.log_softmax(heads[t](experts[t](x)), -1)
            student = torch.log_softmax(model(x, t), -1)
            total += float((teacher.exp() * (teacher - student)).sum(-1).mean())
    return total


@pytest.mark.parametrize(
    "kw",
    [{}, {"learn_mask": False}, {"learn_rotations": False}, {"base": "ties"}],
    ids=["both", "rotation-only", "mask-only", "ties-base"],
)
def test_fitting_lowers_kl_to_experts_versus_base_merge(problem, unlabeled, kw):
    pre, experts, heads, _ = problem
    common = dict(sparsity=0.3, rotation_lr=0.01, validation_fraction=0.0, random_state=0, **kw)
    base = MOMAMerger(pre, experts, heads, n_steps=0, **{**common, "sparsity": 0.0}).fit(unlabeled)
    fitted = MOMAMerger(pre, experts, heads, n_steps=60, **common).fit(unlabeled)
    kl_base = kl_of(base.transform(), experts, heads, unlabeled)
    kl_fit = kl_of(fitted.transform(), experts, heads, unlabeled)
    assert kl_fit < 0.9 * kl_base, (kl_base, kl_fit)


def test_ablations_are_what_they_say(problem, unlabeled):
    pre, experts, heads, _ = problem
    rot_only = MOMAMerger(pre, experts, heads, learn_mask=False, n_steps=10, rotation_lr=0.05, random_state=0)
    rot_only.fit(unlabeled)
    assert all(bool(m.all()) for m in rot_only.mask_.values())
    assert any(not torch.allclose(q, torch.eye(8)) for q in rot_only.rotations_.values())
    mask_only = MOMAMerger(pre, experts, heads, learn_rotations=False, sparsity=0.2, n_steps=10, random_state=0)
    mask_only.fit(unlabeled)
    assert all(torch.equal(q, torch.eye(8)) for q in mask_only.rotations_.values())
    assert sum(int((~m).sum()) for m in mask_only.mask_.values()) > 0


def test_same_random_state_gives_identical_results_and_refit_overwrites(problem, unlabeled):
    pre, experts, heads, _ = problem
    a = MOMAMerger(pre, experts, heads, n_steps=8, sparsity=0.2, random_state=7).fit(unlabeled)
    b = MOMAMerger(pre, experts, heads, n_steps=8, sparsity=0.2, random_state=7).fit(unlabeled)
    assert all(torch.equal(a.mask_[k], b.mask_[k]) for k in a.mask_)
    assert all(torch.equal(a.rotations_[t], b.rotations_[t]) for t in a.rotations_)
    a.set_params(n_steps=2, sparsity=0.5)
    a.fit(unlabeled)
    assert a.n_iter_ == 2 and len(a.history_) == 2
    n_total = sum(m.numel() for m in a.mask_.values())
    assert sum(int((~m).sum()) for m in a.mask_.values()) == round(0.5 * n_total)


def test_fit_accepts_loaders_datasets_arrays_and_ignores_labels(problem):
    from torch.utils.data import DataLoader, TensorDataset

    pre, experts, heads, data = problem
    names = list(data)
    X = {
        names[0]: DataLoader(TensorDataset(*data[names[0]]), batch_size=5),
        names[1]: TensorDataset(*data[names[1]]),
        names[2]: data[names[2]][0].numpy(),
    }
    X_plain = {t: x for t, (x, _) in data.items()}
    kw = dict(n_steps=5, sparsity=0.2, random_state=3)
    a = MOMAMerger(pre, experts, heads, **kw).fit(X)
    b = MOMAMerger(pre, experts, heads, **kw).fit(X_plain)
    assert all(torch.equal(a.mask_[k], b.mask_[k]) for k in a.mask_)
    assert all(torch.equal(a.rotations_[t], b.rotations_[t]) for t in a.rotations_)


def test_score_is_mean_of_per_task_accuracy(problem, unlabeled):
    pre, experts, heads, data = problem
    merger = MOMAMerger(pre, experts, heads, n_steps=3, random_state=0).fit(unlabeled)
    per_task = merger.score_per_task(data)
    model = merger.transform()
    for t, (x, y) in data.items():
        with torch.no_grad():
            acc = float((model(x, t).argmax(-1) == y).float().mean())
        assert per_task[t] == pytest.approx(acc)
    assert merger.score(data) == pytest.approx(np.mean(list(per_task.values())))
    y = {t: lab for t, (_, lab) in data.items()}
    assert merger.score(unlabeled, y) == pytest.approx(merger.score(data))
    # labels as tensors, lists, arrays and from labelled loaders all score the same
    from torch.utils.data import DataLoader, TensorDataset

    as_lists = {t: (x, lab.tolist()) for t, (x, lab) in data.items()}
    as_arrays = {t: (x.numpy(), lab.numpy()) for t, (x, lab) in data.items()}
    loaders = {t: DataLoader(TensorDataset(x, lab), batch_size=5) for t, (x, lab) in data.items()}
    for other in (as_lists, as_arrays, loaders):
        assert merger.score_per_task(other) == pytest.approx(per_task)


def test_lists_name_tasks_by_position(problem, unlabeled):
    pre, experts, heads, _ = problem
    merger = MOMAMerger(pre, list(experts.values()), list(heads.values()), n_steps=2, random_state=0)
    merger.fit(list(unlabeled.values()) and dict(zip(["0", "1", "2"], unlabeled.values())))
    assert merger.tasks_ == ["0", "1", "2"]


def test_clone_shares_modules_and_copies_the_rest(problem):
    pre, experts, heads, _ = problem
    merger = MOMAMerger(pre, experts, heads, sparsity=0.3, n_steps=4)
    c = clone(merger)
    assert c.pretrained_encoder is pre and c.finetuned_encoders is experts and c.heads is heads
    assert c.get_params(deep=False).keys() == merger.get_params(deep=False).keys()
    assert c.sparsity == 0.3 and not hasattr(c, "mask_")


def test_get_set_params_round_trip(problem):
    pre, experts, heads, _ = problem
    merger = MOMAMerger(pre, experts, heads)
    params = merger.get_params(deep=False)
    other = MOMAMerger().set_params(**params)
    assert other.get_params(deep=False) == params


def test_save_load_gives_bit_identical_merged_weights(problem, unlabeled, tmp_path):
    pre, experts, heads, _ = problem
    merger = MOMAMerger(pre, experts, heads, n_steps=5, sparsity=0.25, random_state=0).fit(unlabeled)
    path = tmp_path / "merger.joblib"
    merger.save(path)
    loaded = MOMAMerger.load(path, pre, experts, heads)
    a, b = merger.transform().state_dict(), loaded.transform().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.sparsity == 0.25 and loaded.tasks_ == merger.tasks_
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "change", [{"scaling": 0.9}, {"base": "ties"}, {"base": "ties", "top_k": 0.5}], ids=["scaling", "base", "top_k"]
)
def test_set_params_after_fit_waits_for_the_next_fit(problem, unlabeled, change):
    pre, experts, heads, data = problem
    merger = MOMAMerger(pre, experts, heads, n_steps=3, sparsity=0.25, random_state=0).fit(unlabeled)
    assert merger.merge_params_ == {"base": "task_arithmetic", "scaling": 0.3, "top_k": 0.2}
    before, score = merger.transform().state_dict(), merger.score_per_task(data)
    merger.set_params(**change)
    after = merger.transform().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert merger.score_per_task(data) == score
    refit = merger.fit(unlabeled)
    assert refit.merge_params_ == {**{"base": "task_arithmetic", "scaling": 0.3, "top_k": 0.2}, **change}
    changed = refit.transform().state_dict()
    assert any(not torch.equal(before[k], changed[k]) for k in before)


def test_load_of_a_file_without_merge_params_uses_the_saved_parameters(problem, unlabeled, tmp_path):
    import joblib

    pre, experts, heads, _ = problem
    merger = MOMAMerger(pre, experts, heads, n_steps=3, scaling=0.5, random_state=0).fit(unlabeled)
    path = tmp_path / "merger.joblib"
    merger.save(path)
    state = joblib.load(path)
    assert state["fitted"]["merge_params_"]["scaling"] == 0.5
    del state["fitted"]["merge_params_"]  # a file written before merge_params_ existed
    joblib.dump(state, path)
    del state["fitted"]["extra_params_"]
    joblib.dump(state, path)
    loaded = MOMAMerger.load(path, pre, experts, heads)
    assert loaded.merge_params_["scaling"] == 0.5 and loaded.extra_params_ == 0  # from the saved parameters
    a, b = merger.transform().state_dict(), loaded.transform().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded.set_params(scaling=0.9).save(path)  # saves again; the fitted setting stays
    again = MOMAMerger.load(path, pre, experts, heads).transform().state_dict()
    assert all(torch.equal(a[k], again[k]) for k in a)


def test_a_merger_pickled_before_new_parameters_existed_still_works(problem, unlabeled):
    import pickle

    pre, experts, heads, data = problem
    merger = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(unlabeled)
    old = pickle.loads(pickle.dumps(merger))
    for name in ("max_samples_per_task", "merge_params_", "extra_params_"):
        del old.__dict__[name]  # as an earlier version pickled it
    revived = pickle.loads(pickle.dumps(old))
    assert revived.get_params()["max_samples_per_task"] is None and revived.merge_params_ == merger.merge_params_
    assert "MOMAMerger(" in repr(revived) and revived.score(data) == merger.score(data)
    clone(revived).fit(unlabeled)


def test_score_uses_the_fitted_settings_and_warnings_point_at_the_caller(problem, unlabeled, tmp_path, monkeypatch):
    pre, experts, heads, data = problem
    merger = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(unlabeled)
    score = merger.score(data)
    assert merger.set_params(scaling=-1.0, sparsity=2.0).score(data) == score  # settings of the next fit
    with pytest.warns(UserWarning, match="holds out no sample") as record:
        MOMAMerger(pre, experts, heads, n_steps=1, validation_fraction=0.01).fit(unlabeled)
    assert record[0].filename == __file__
    monkeypatch.setenv("HOME", str(tmp_path))
    merger.save("~/models/merger.joblib")
    assert (tmp_path / "models" / "merger.joblib").is_file()
    assert MOMAMerger.load("~/models/merger.joblib", pre, experts, heads).score(data) == score


def test_load_and_transform_take_the_models_in_any_task_order(problem, unlabeled, tmp_path):
    pre, experts, heads, _ = problem
    merger = MOMAMerger(pre, experts, heads, n_steps=3, sparsity=0.25, base="ties", random_state=0).fit(unlabeled)
    path = tmp_path / "merger.joblib"
    merger.save(path)
    rev_experts, rev_heads = dict(reversed(experts.items())), dict(reversed(heads.items()))
    loaded = MOMAMerger.load(path, pre, rev_experts, rev_heads)
    assert loaded.tasks_ == merger.tasks_
    a, b = merger.transform().state_dict(), loaded.transform().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="was fitted on tasks"):
        MOMAMerger.load(path, pre, dict(list(experts.items())[:2]), dict(list(heads.items())[:2]))


def test_save_makes_its_folder_and_load_picks_a_usable_device(problem, unlabeled, tmp_path, monkeypatch):
    pre, experts, heads, _ = problem
    merger = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(unlabeled)
    path = tmp_path / "new" / "folder" / "merger.joblib"
    merger.save(path)
    # a merger fitted on a GPU machine (device="cuda" saved), loaded where there is no CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    merger.set_params(device="cuda").save(path)
    loaded = MOMAMerger.load(path, pre, experts, heads)
    assert loaded.device == "cpu"
    a, b = merger.set_params(device="cpu").transform().state_dict(), loaded.transform().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert MOMAMerger.load(path, pre, experts, heads, device="cpu").device == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        MOMAMerger.load(path, pre, experts, heads, device="cuda")


def test_bf16_autocast_on_cpu_keeps_fp32_mask_scores_and_rotations(problem, unlabeled):
    pre, experts, heads, data = problem
    m = MOMAMerger(pre, experts, heads, n_steps=5, precision="bf16", sparsity=0.2, random_state=0).fit(unlabeled)
    assert all(q.dtype == torch.float32 for q in m.rotations_.values())
    assert all(torch.allclose(q @ q.T, torch.eye(8), atol=1e-5) for q in m.rotations_.values())
    n_total = sum(v.numel() for v in m.mask_.values())
    assert sum(int((~v).sum()) for v in m.mask_.values()) == round(0.2 * n_total)
    assert m.transform().encoder.proj.dtype == torch.float32


@pytest.mark.parametrize("base", ["task_arithmetic", "ties"])
def test_finetuned_encoders_as_checkpoint_paths_give_the_same_fit(problem, unlabeled, tmp_path, base):
    pre, experts, heads, _ = problem
    paths = _save_experts(experts, tmp_path)
    kw = dict(n_steps=5, sparsity=0.2, base=base, random_state=0)
    from_paths = MOMAMerger(pre, paths, heads, **kw).fit(unlabeled)
    from_modules = MOMAMerger(pre, experts, heads, **kw).fit(unlabeled)
    assert all(torch.equal(from_paths.mask_[k], from_modules.mask_[k]) for k in from_modules.mask_)
    a, b = from_paths.transform().state_dict(), from_modules.transform().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize(
    ("batching", "micro"),
    [
        ("sequential", None),
        (2, None),
        ("sequential", 5),  # each task's 16 samples in passes of 5, 5, 5 and 1
        ("joint", 7),  # passes of 7 samples that span two tasks
        ("joint", 16),  # one pass per task, cut from the joint batch
    ],
)
def test_task_batching_takes_the_same_steps_as_joint(problem, unlabeled, batching, micro):
    pre, experts, heads, _ = problem
    kw = dict(n_steps=8, sparsity=0.2, rotation_lr=0.01, validation_fraction=0.0, random_state=0)
    joint = MOMAMerger(pre, experts, heads, task_batching="joint", **kw).fit(unlabeled)
    other = MOMAMerger(pre, experts, heads, task_batching=batching, micro_batch_size=micro, **kw).fit(unlabeled)
    for a, b in zip(joint.history_, other.history_):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["per_task_loss"] == pytest.approx(b["per_task_loss"], rel=1e-4)
    for t in joint.rotations_:
        assert torch.allclose(joint.rotations_[t], other.rotations_[t], atol=1e-5)
    agree = sum(int((joint.mask_[k] == other.mask_[k]).sum()) for k in joint.mask_)
    assert agree / sum(m.numel() for m in joint.mask_.values()) > 0.999
    # the mask moved away from its magnitude-pruning start, so the steps compared above did something
    start = MOMAMerger(pre, experts, heads, **{**kw, "n_steps": 0}).fit(unlabeled)
    changed = sum(int((start.mask_[k] != other.mask_[k]).sum()) for k in other.mask_)
    assert changed > 0


def test_task_batching_is_validated(problem, unlabeled):
    pre, experts, heads, _ = problem
    with pytest.raises(ValueError, match="unknown task_batching 'parallel'"):
        MOMAMerger(pre, experts, heads, task_batching="parallel").fit(unlabeled)
    with pytest.raises(ValueError, match="positive number of tasks per pass, got 0"):
        MOMAMerger(pre, experts, heads, task_batching=0).fit(unlabeled)
    with pytest.raises(TypeError, match="task_batching must be"):
        MOMAMerger(pre, experts, heads, task_batching=1.5).fit(unlabeled)


def test_task_groups_cover_every_task_once():
    from momaestimator.merging import task_groups

    tasks = [f"t{i}" for i in range(7)]
    for batching, expected in [("joint", 1), ("sequential", 7), (3, 3), (10, 1), (1, 7)]:
        groups = task_groups(tasks, batching)
        assert len(groups) == expected
        assert [i for g in groups for i in g] == list(range(7))


def test_ties_base_from_checkpoint_paths_holds_one_expert_at_a_time(problem, unlabeled, tmp_path, monkeypatch):
    import momaestimator.merger as merger_module

    pre, experts, heads, _ = problem
    paths = _save_experts(experts, tmp_path)
    alive, loads, real = _Alive(), [], merger_module._load_state

    def tracking_load(source, task, *args):
        loads.append(task)
        return alive.track(real(source, task, *args))

    merger = MOMAMerger(pre, paths, heads, base="ties", n_steps=2, random_state=0)
    tasks, pre_state, fts, _ = merger._check_models(values=False)
    monkeypatch.setattr(merger_module, "_load_state", tracking_load)
    tau = merger._multitask_vector(pre_state, fts, "cpu")
    assert alive.peak == 1 and alive.now == 0
    assert loads == tasks + tasks  # two passes over the checkpoints
    expected = multitask_vector(pre, experts, base="ties", top_k=merger.top_k)
    assert set(tau) == set(expected) and all(torch.equal(tau[k], expected[k]) for k in expected)


@pytest.mark.parametrize("base", ["task_arithmetic", "ties"])
def test_finetuned_encoders_as_loaders_give_the_same_fit_one_expert_at_a_time(problem, unlabeled, base):
    pre, experts, heads, _ = problem
    alive, calls = _Alive(), []

    def loader(task):
        def load():
            calls.append(task)
            return alive.track({k: v.clone() for k, v in experts[task].state_dict().items()})

        return load

    kw = dict(n_steps=4, sparsity=0.2, base=base, random_state=0)
    lazy = MOMAMerger(pre, {t: loader(t) for t in experts}, heads, **kw).fit(unlabeled)
    assert alive.peak == 1 and alive.now == 0  # never two experts at once, none kept
    reads = 2 + (2 if base == "ties" else 0)  # validation, teacher logits (with TA's tau_MT), TIES' two passes
    assert sorted(calls) == sorted(list(experts) * reads)
    eager = MOMAMerger(pre, experts, heads, **kw).fit(unlabeled)
    assert all(torch.equal(lazy.mask_[k], eager.mask_[k]) for k in eager.mask_)
    assert all(torch.equal(lazy.rotations_[t], eager.rotations_[t]) for t in eager.rotations_)
    a, b = lazy.transform().state_dict(), eager.transform().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_bad_lazy_experts_are_named_before_any_work(problem, unlabeled, tmp_path):
    from safetensors.torch import save_file

    pre, experts, heads, _ = problem
    bad = {k: v.contiguous() for k, v in experts["task0"].state_dict().items()}
    bad["proj"] = torch.zeros(3, 3)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    paths = {**experts, "task0": tmp_path / "bad.safetensors"}
    with pytest.raises(ValueError, match=r"finetuned_encoders\['task0'\] differs in architecture"):
        MOMAMerger(pre, paths, heads, n_steps=1).fit(unlabeled)
    with pytest.raises(TypeError, match=r"finetuned_encoders\['task1'\] is a loader that returned a int"):
        MOMAMerger(pre, {**experts, "task1": lambda: 3}, heads, n_steps=1).fit(unlabeled)
    with pytest.raises(TypeError, match=r"finetuned_encoders\['task2'\] must be .*loader"):
        MOMAMerger(pre, {**experts, "task2": 3.5}, heads, n_steps=1).fit(unlabeled)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_non_float32_encoders_fit_the_same_way_in_one_or_several_passes(problem, unlabeled, dtype):
    import copy

    pre, experts, heads, _ = problem
    pre_d = copy.deepcopy(pre).to(dtype)  # the whole model in one dtype, as a half-precision user has it
    experts_d = {t: copy.deepcopy(m).to(dtype) for t, m in experts.items()}
    heads_d = {t: copy.deepcopy(h).to(dtype) for t, h in heads.items()}
    x = {t: v.to(dtype) for t, v in unlabeled.items()}
    kw = dict(n_steps=6, sparsity=0.2, rotation_lr=0.01, validation_fraction=0.0, random_state=0)
    joint = MOMAMerger(pre_d, experts_d, heads_d, task_batching="joint", **kw).fit(x)
    seq = MOMAMerger(pre_d, experts_d, heads_d, task_batching="sequential", **kw).fit(x)
    n_total = sum(v.numel() for v in seq.mask_.values())
    labelled = {t: (v.to(dtype), y) for t, (v, y) in problem[3].items()}
    for m in (joint, seq):
        assert sum(int((~v).sum()) for v in m.mask_.values()) == round(0.2 * n_total)
        model = m.transform()
        assert model.encoder.proj.dtype == dtype
        assert all(p.dtype == dtype for p in model.heads.parameters())
        assert m.score(labelled) > 0.9  # the float32 model scores 1.0 on this toy; chance is 1/3
    rel = 2e-2 if dtype == torch.bfloat16 else 1e-9
    for a, b in zip(joint.history_, seq.history_):
        assert a["loss"] == pytest.approx(b["loss"], rel=rel)
    agree = sum(int((joint.mask_[k] == seq.mask_[k]).sum()) for k in joint.mask_)
    assert agree / n_total > 0.99


def _save_experts(experts, folder):
    """Each expert's state dict as a safetensors checkpoint; ``{task: path}``."""
    from safetensors.torch import save_file

    paths = {}
    for t, m in experts.items():
        paths[t] = folder / f"{t}.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(paths[t]))
    return paths


class _Alive:
    """Counts the state dicts handed out that are still referenced (and the most at once)."""

    def __init__(self):
        self.now = self.peak = 0
        alive = self

        class Tracked(dict):
            def __del__(self):
                alive.now -= 1

        self._cls = Tracked

    def track(self, state):
        self.now += 1
        self.peak = max(self.peak, self.now)
        return self._cls(state)


def test_cuda_graphs_is_a_no_op_off_cuda(problem, unlabeled):
    pre, experts, heads, _ = problem
    kw = dict(n_steps=5, validation_fraction=0.0, random_state=0)
    on = MOMAMerger(pre, experts, heads, cuda_graphs=True, **kw).fit(unlabeled)
    off = MOMAMerger(pre, experts, heads, cuda_graphs=False, **kw).fit(unlabeled)
    assert [h["loss"] for h in on.history_] == [h["loss"] for h in off.history_]
    assert all("graphed" not in h for h in on.history_)  # the key exists on CUDA devices only
