"""Inputs at the edges of the contract: task keys, dtypes, tied weights, heads, data sources, labels."""

import copy
import warnings

import numpy as np
import pytest
import torch
from conftest import counting_loaders, fingerprint_all
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from momaestimator import LinearHead, MOMAMerger, TaskSamples
from momaestimator.baselines import AdaMerging, TaskArithmetic
from momaestimator.merging.fit import HeadSpec, moma_logits
from momaestimator.merging.functional import rotation_mismatch, structure_copy


@pytest.fixture(scope="module")
def fitted(problem, unlabeled):
    pre, experts, heads, _ = problem
    return MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(unlabeled)


# ---------------------------------------------------------------- task keys
def test_keys_that_name_the_same_task_are_refused(problem, unlabeled):
    pre, experts, heads, _ = problem
    e = {0: experts["task0"], "0": experts["task1"]}
    h = {0: heads["task0"], "0": heads["task1"]}
    with pytest.raises(ValueError, match=r"finetuned_encoders has the keys 0 and '0', which name the same task '0'"):
        MOMAMerger(pre, e, h).fit({0: unlabeled["task0"], "0": unlabeled["task1"]})
    with pytest.raises(ValueError, match=r"inputs has the keys 1 and '1'"):
        TaskSamples.from_arrays({1: np.zeros((2, 3)), "1": np.ones((2, 3))})
    with pytest.raises(ValueError, match=r"storage has the keys"):
        TaskSamples({1: np.zeros((2, 3)), "1": np.ones((2, 3))})


def test_integer_task_keys_serve_as_strings(problem, unlabeled):
    pre, experts, heads, data = problem
    keyed = {i: t for i, t in enumerate(experts)}
    merger = MOMAMerger(
        pre, {i: experts[t] for i, t in keyed.items()}, {i: heads[t] for i, t in keyed.items()}, n_steps=1
    ).fit({i: unlabeled[t] for i, t in keyed.items()})
    assert merger.tasks_ == ["0", "1", "2"]
    model = merger.transform()
    x = unlabeled["task1"][:4]
    assert torch.equal(model(x, 1), model(x, "1"))
    # TaskSamples built directly normalises its keys too, so scoring with int keys works
    ts = TaskSamples({i: data[t][0] for i, t in keyed.items()}, {i: data[t][1] for i, t in keyed.items()})
    assert ts.tasks == ["0", "1", "2"] and set(merger.score_per_task(ts)) == {"0", "1", "2"}


# ---------------------------------------------------------------- dtypes
def test_expert_in_another_dtype_is_cast_to_the_pretrained_one(problem, unlabeled):
    pre, experts, heads, _ = problem
    mixed = {**experts, "task1": copy.deepcopy(experts["task1"]).double()}
    before = fingerprint_all(pre, mixed, heads)
    a = MOMAMerger(pre, mixed, heads, n_steps=2, random_state=0).fit(unlabeled)
    b = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(unlabeled)
    assert fingerprint_all(pre, mixed, heads) == before  # the float64 expert is not touched
    # the float64 copy rounds back to the same float32 weights: the same fit, the same merged model
    assert all(torch.equal(a.mask_[k], b.mask_[k]) for k in b.mask_)
    state = a.merged_state_dict()
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    assert all(torch.equal(state[k], v) for k, v in b.merged_state_dict().items())


def test_heads_in_another_dtype_than_the_encoder_are_refused(problem, unlabeled):
    pre, experts, heads, _ = problem
    h64 = {t: copy.deepcopy(h).double() for t, h in heads.items()}
    with pytest.raises(ValueError, match=r"heads\['task0'\] has torch.float64 weights, the encoder torch.float32"):
        MOMAMerger(pre, experts, h64, n_steps=1).fit(unlabeled)


def test_baselines_refuse_experts_of_another_dtype(problem, unlabeled):
    from momaestimator.baselines import TaskArithmetic

    pre, experts, heads, _ = problem
    mixed = {**experts, "task2": copy.deepcopy(experts["task2"]).double()}
    with pytest.raises(ValueError, match=r"finetuned_encoders\['task2'\]: entry .* is torch.float64"):
        TaskArithmetic(pre, mixed, heads).fit(unlabeled)


# ---------------------------------------------------------------- tied weights
class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight  # one parameter, two state-dict names

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("as_state_dicts", [False, True])
def test_tied_weights_are_one_entry_and_the_absorbed_model_is_the_fitted_one(as_state_dicts):
    torch.manual_seed(0)
    pre, experts = _Tied(), {}
    for t in "xy":
        e = copy.deepcopy(pre)
        with torch.no_grad():
            e.a.weight.add_(torch.randn(4, 4))
        experts[t] = e.state_dict() if as_state_dicts else e  # state dicts carry both names
    heads = {t: nn.Linear(4, 3) for t in "xy"}
    X = {t: torch.randn(10, 4) for t in "xy"}
    merger = MOMAMerger(pre, experts, heads, n_steps=3, random_state=0, sparsity=0.4, validation_fraction=0.0).fit(X)
    assert list(merger.mask_) == ["a.weight"]  # one mask for the tied tensor, counted once
    assert int((~merger.mask_["a.weight"]).sum()) == round(0.4 * 16)
    model = merger.transform()
    assert model.encoder.a.weight is model.encoder.b.weight  # still tied in the user's class
    spec = HeadSpec(structure_copy(heads["x"]), dict(heads["x"].state_dict()))
    fit_logits, _ = moma_logits(structure_copy(pre), merger.merged_state_dict(), spec, merger.rotations_["x"], X["x"])
    torch.testing.assert_close(model(X["x"], "x"), fit_logits, rtol=1e-5, atol=1e-6)
    state = merger.merged_state_dict()
    assert list(state) == list(pre.state_dict()) and state["a.weight"] is state["b.weight"]  # both names
    fresh = copy.deepcopy(pre)
    fresh.load_state_dict(state)  # what the user's class takes
    assert torch.equal(fresh(X["x"]), model.encoder(X["x"]))


# ---------------------------------------------------------------- heads that cannot absorb a rotation
class _CentredHead(nn.Module):
    """Centres its input before the linear map: rotating the weight is not rotating the input."""

    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, z):
        return nn.functional.linear(z - z.mean(-1, keepdim=True), self.weight)


def test_rotation_mismatch_tells_absorbable_heads_from_the_rest():
    torch.manual_seed(0)
    assert rotation_mismatch(LinearHead(torch.randn(3, 6))) < 1e-12  # normalising: norms are rotation invariant
    assert rotation_mismatch(nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))) < 1e-12
    assert rotation_mismatch(nn.Linear(6, 3).half()) < 1e-12  # evaluated in float64
    assert rotation_mismatch(_CentredHead(torch.randn(3, 6))) > 1e-2


def test_head_that_cannot_absorb_a_rotation_is_refused_unless_rotations_are_off(problem, unlabeled):
    pre, experts, heads, _ = problem
    centred = {t: _CentredHead(h.weight.detach().clone()) for t, h in heads.items()}
    with pytest.raises(ValueError, match=r"heads\['task0'\] \(_CentredHead\) cannot absorb a rotation"):
        MOMAMerger(pre, experts, centred, n_steps=1).fit(unlabeled)
    merger = MOMAMerger(pre, experts, centred, n_steps=1, learn_rotations=False).fit(unlabeled)
    assert all(torch.equal(q, torch.eye(q.shape[0])) for q in merger.rotations_.values())


# ---------------------------------------------------------------- data sources
class _Samples(IterableDataset):
    def __init__(self, x, y=None):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(self.x) if self.y is None else iter(zip(self.x, self.y))


def test_iterable_dataset_items_are_samples(problem, unlabeled, fitted):
    pre, experts, heads, data = problem
    a = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit({t: _Samples(x) for t, x in unlabeled.items()})
    assert all(torch.equal(a.mask_[k], fitted.mask_[k]) for k in fitted.mask_)
    assert all(torch.equal(a.rotations_[t], fitted.rotations_[t]) for t in fitted.tasks_)
    assert fitted.score_per_task({t: _Samples(x, y) for t, (x, y) in data.items()}) == fitted.score_per_task(data)


def test_labels_with_a_loader_are_counted_per_sample_not_per_batch(problem, fitted):
    data = problem[3]
    via_loader = fitted.score_per_task({t: (DataLoader(x, batch_size=5), y) for t, (x, y) in data.items()})
    assert via_loader == fitted.score_per_task(data)


def test_empty_scoring_data_is_refused(fitted, problem):
    with pytest.raises(ValueError, match="X is empty: name at least one task"):
        fitted.score({})
    with pytest.raises(ValueError, match="X is an empty TaskSamples"):
        fitted.score(TaskSamples.from_arrays({t: x for t, (x, _) in problem[3].items()})[[]])


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (lambda y: y + 10, r"task 'task0': label 1\d is not a class of its head \(classes 0..2\)"),
        (lambda y: y - 5, r"task 'task0': label -\d is not a class of its head"),
        (lambda y: y + 0.5, "task 'task0': labels must be whole class indices"),
        (lambda y: np.array(["a"] * len(y)), "task 'task0': labels must be integer class indices"),
    ],
)
def test_labels_that_are_not_class_indices_are_refused(fitted, problem, labels, match):
    data = problem[3]
    bad = {**data, "task0": (data["task0"][0], labels(np.asarray(data["task0"][1])))}
    with pytest.raises(ValueError, match=match):
        fitted.score(bad)
    whole = {**data, "task0": (data["task0"][0], np.asarray(data["task0"][1], dtype=float))}
    assert fitted.score(whole) == fitted.score(data)  # floats holding whole numbers are labels


def test_read_only_arrays_fit_without_a_warning(problem, unlabeled):
    pre, experts, heads, _ = problem
    arrays = {t: x.numpy().copy() for t, x in unlabeled.items()}
    for a in arrays.values():
        a.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MOMAMerger(pre, experts, heads, n_steps=1, validation_fraction=0.0).fit(arrays)


def test_a_holdout_too_small_for_some_task_is_announced(problem, unlabeled):
    pre, experts, heads, _ = problem
    tiny = {**unlabeled, "task2": unlabeled["task2"][:2]}  # 0.2 * 2 rounds to no held-out sample
    with pytest.warns(UserWarning, match=r"holds out no sample of task\(s\) \{'task2': 2\}"):
        merger = MOMAMerger(pre, experts, heads, n_steps=2, validation_fraction=0.2).fit(tiny)
    assert all("valid_loss" not in h for h in merger.history_)


# ---------------------------------------------------------------- persistence
def test_load_checks_heads_against_the_saved_rotations(fitted, problem, tmp_path):
    pre, experts, heads, _ = problem
    fitted.save(tmp_path / "m.joblib")
    with pytest.raises(ValueError, match=r"heads\['task0'\] expects 5 input features but the encoder outputs 8"):
        MOMAMerger.load(tmp_path / "m.joblib", pre, experts, {t: nn.Linear(5, 3) for t in heads})


def test_save_keeps_a_numpy_integer_seed(problem, unlabeled, tmp_path):
    pre, experts, heads, _ = problem
    MOMAMerger(pre, experts, heads, n_steps=1, random_state=np.int64(7)).fit(unlabeled).save(tmp_path / "m.joblib")
    loaded = MOMAMerger.load(tmp_path / "m.joblib", pre, experts, heads)
    assert loaded.random_state == 7 and type(loaded.random_state) is int


def test_integer_images_are_scored_in_the_model_dtype(problem):
    pre, experts, heads, data = problem
    cast = lambda m: copy.deepcopy(m).double()  # noqa: E731
    images = {t: (torch.randint(0, 3, x.shape, dtype=torch.uint8), y) for t, (x, y) in data.items()}
    merger = MOMAMerger(
        cast(pre), {t: cast(e) for t, e in experts.items()}, {t: cast(h) for t, h in heads.items()}, n_steps=1
    ).fit({t: x for t, (x, _) in images.items()})
    model = merger.transform()
    expected = {}
    with torch.no_grad():
        for t, (x, y) in images.items():
            expected[t] = float((model(x.double(), t).argmax(-1) == torch.as_tensor(y)).double().mean())
    assert merger.score_per_task(images) == expected


# ---------------------------------------------------------------- labels fit never reads, labels scored as given
class _Items(torch.utils.data.Dataset):
    """A map-style dataset of ``(x, label)`` items that counts its reads."""

    def __init__(self, x, labels):
        self.x, self.labels, self.reads = x, labels, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.labels[i]


@pytest.mark.parametrize("label", [lambda y: torch.nn.functional.one_hot(torch.tensor(y), 3), lambda y: f"class{y}"])
def test_fit_never_reads_the_labels_of_dataset_items(problem, unlabeled, fitted, label):
    pre, experts, heads, data = problem
    datasets = {t: _Items(x, [label(int(v)) for v in data[t][1]]) for t, x in unlabeled.items()}
    a = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(datasets)
    assert all(torch.equal(a.mask_[k], fitted.mask_[k]) for k in fitted.mask_)
    b = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(TaskSamples.from_datasets(datasets))
    assert all(torch.equal(b.mask_[k], fitted.mask_[k]) for k in fitted.mask_)
    with pytest.raises((ValueError, TypeError), match=r"the label of (X\['task0'\]\[0\]|task 'task0' item 0) "):
        fitted.score(datasets)


def test_dataset_labels_are_not_truncated_to_integers(problem, fitted):
    data = problem[3]
    frac = {t: _Items(x, [float(v) + 0.7 for v in y]) for t, (x, y) in data.items()}
    with pytest.raises(ValueError, match="labels must be whole class indices"):
        fitted.score(frac)
    with pytest.raises(ValueError, match="labels must be whole class indices"):
        fitted.score(TaskSamples.from_datasets(frac))
    ts = TaskSamples.from_arrays({"a": np.zeros((3, 2))}, {"a": [0.5, 1.7, 2.9]})
    assert ts.targets().tolist() == [0.5, 1.7, 2.9]
    whole = {t: _Items(x, [float(v) for v in y]) for t, (x, y) in data.items()}
    assert fitted.score(whole) == fitted.score(data)


def test_a_task_samples_dataset_item_is_read_once_per_pass(problem, unlabeled, fitted):
    data = problem[3]
    datasets = {t: _Items(x, [int(v) for v in data[t][1]]) for t, x in unlabeled.items()}
    ts = TaskSamples.from_datasets(datasets)
    fitted.score(ts)
    assert [d.reads for d in datasets.values()] == [len(x) for x in unlabeled.values()]


# ---------------------------------------------------------------- labels given apart from a loader
def test_labels_apart_from_a_loader_are_counted_before_scoring(problem, fitted):
    data = problem[3]
    x, y = data["task0"]
    extra = {**data, "task0": (DataLoader(x, batch_size=5), np.concatenate([y, y[:3]]))}
    with pytest.raises(ValueError, match=rf"task 'task0': {len(y) + 3} labels for the {len(y)} samples its DataLoader"):
        fitted.score(extra)
    dropped = {**data, "task0": (DataLoader(x, batch_size=7, drop_last=True), y)}
    with pytest.raises(ValueError, match=rf"{len(y)} labels for the {len(y) // 7 * 7} samples"):
        fitted.score(dropped)
    with pytest.raises(ValueError, match=r"labels for the \d+ samples read from its data"):
        fitted.score({**data, "task0": (iter([x[:5], x[5:10]]), y)})  # a generator: counted as it is read


def test_labels_apart_from_a_shuffling_loader_are_refused(problem, fitted):
    data = problem[3]
    x, y = data["task0"]
    shuffled = {**data, "task0": (DataLoader(torch.utils.data.TensorDataset(x, torch.as_tensor(y)), shuffle=True), y)}
    with pytest.raises(
        ValueError, match="task 'task0': labels are given apart from a DataLoader whose sampler is Rand"
    ):
        fitted.score(shuffled)
    own = {**data, "task0": DataLoader(torch.utils.data.TensorDataset(x, torch.as_tensor(y)), shuffle=True)}
    assert fitted.score_per_task(own)["task0"] == fitted.score_per_task(data)["task0"]  # its own labels: fine


# ---------------------------------------------------------------- clear errors
@pytest.mark.parametrize("name", ["cifar.10", "", 0.5])
def test_task_names_a_module_dict_cannot_hold_are_refused_before_fitting(problem, unlabeled, name):
    pre, experts, heads, _ = problem
    e = {name if t == "task0" else t: v for t, v in experts.items()}
    h = {name if t == "task0" else t: v for t, v in heads.items()}
    x = {name if t == "task0" else t: v for t, v in unlabeled.items()}
    with pytest.raises(ValueError, match=r"has the task name .*: a task name must be non-empty and contain no '\.'"):
        MOMAMerger(pre, e, h, n_steps=1).fit(x)


@pytest.mark.parametrize("name", ["train", "eval", "keys", "forward", "training"])
@pytest.mark.parametrize("cls", [MOMAMerger, TaskArithmetic, AdaMerging])
def test_task_names_that_shadow_module_dict_attributes_are_refused_before_fitting(problem, unlabeled, name, cls):
    pre, experts, heads, _ = problem
    rename = lambda d: {name if t == "task0" else t: v for t, v in d.items()}  # noqa: E731
    est = cls(pre, rename(experts), rename(heads), **({"n_steps": 1} if cls is not TaskArithmetic else {}))
    with pytest.raises(ValueError, match=f"has the task name '{name}', which is an attribute of torch's ModuleDict"):
        est.fit(rename(unlabeled))
    assert not [k for k in vars(est) if k.endswith("_") and not k.startswith("_")]


def test_unclear_inputs_get_errors_that_name_them(problem, fitted):
    data = problem[3]
    ts = TaskSamples.from_arrays({t: x for t, (x, _) in data.items()})
    with pytest.raises(
        TypeError, match="y must be an array with one label per sample of X .a TaskSamples., got a dict"
    ):
        fitted.score(ts, {t: y for t, (_, y) in data.items()})
    with pytest.raises(TypeError, match=r"inputs\['a'\] is a DataLoader; expected an array or tensor"):
        TaskSamples.from_arrays({"a": DataLoader(torch.zeros(3, 2))})
    with pytest.raises(TypeError, match=r"labels\['a'\] is None"):
        TaskSamples.from_arrays({"a": np.zeros((3, 2))}, {"a": None})
    with pytest.raises(
        ValueError, match=r"X\['task0'\] holds samples of different shapes \[\(3, 8, 8\), \(3, 9, 9\)\]"
    ):
        fitted.score({**data, "task0": ([torch.zeros(3, 8, 8), torch.zeros(3, 9, 9)], [0, 1])})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted.score({"task0": data["task0"][0]}, {t: y for t, (_, y) in data.items() if t != "task2"})
    assert [str(w.message) for w in caught] == [
        "y has labels for tasks ['task1'] that X does not have; they are not used"
    ]


def test_a_zero_dimensional_integer_index_is_one_sample():
    ts = TaskSamples.from_arrays({"a": np.zeros((4, 2)), "b": np.ones((3, 2))}, {"a": [0, 1, 0, 1], "b": [2, 2, 2]})
    for key in (np.array(5), torch.tensor(5), np.int64(5), 5):
        sub = ts[key]
        assert len(sub) == 1 and sub.targets().tolist() == [2] and repr(sub) == "TaskSamples(a=0, b=1)"
    with pytest.raises(IndexError, match="not a single boolean"):
        ts[True]


def test_verbose_takes_a_bool_and_batches_come_as_an_iterator(problem, unlabeled, capsys):
    pre, experts, heads, _ = problem
    ref = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(unlabeled)
    loud = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0, verbose=True).fit(unlabeled)
    assert "MOMA fit" in capsys.readouterr().err
    batches = {t: iter([x[:5], x[5:]]) for t, x in unlabeled.items()}
    split = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(batches)
    for other in (loud, split):
        assert all(torch.equal(ref.rotations_[t], other.rotations_[t]) for t in ref.tasks_)
        assert all(torch.equal(ref.mask_[k], other.mask_[k]) for k in ref.mask_)
    with pytest.raises(TypeError, match="verbose must be an int"):
        MOMAMerger(pre, experts, heads, verbose="yes").fit(unlabeled)


def test_max_samples_per_task_reads_the_first_samples_and_stops_reading(problem, unlabeled):
    pre, experts, heads, _ = problem
    reads = []

    class Counting(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            reads.append(i)
            return self.x[i]

    cap = 7
    first = {t: x[:cap] for t, x in unlabeled.items()}
    loaders = {t: DataLoader(Counting(x), batch_size=3) for t, x in unlabeled.items()}
    ref = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(first)
    for X in (unlabeled, loaders):
        reads.clear()
        capped = MOMAMerger(pre, experts, heads, n_steps=2, max_samples_per_task=cap, random_state=0).fit(X)
        assert all(torch.equal(ref.rotations_[t], capped.rotations_[t]) for t in ref.tasks_)
        assert all(torch.equal(ref.mask_[k], capped.mask_[k]) for k in ref.mask_)
    assert len(reads) == len(unlabeled) * 9  # three batches of 3 per task: no further
    reads.clear()
    MOMAMerger(pre, experts, heads, n_steps=1, max_samples_per_task=cap).fit(
        {t: Counting(x) for t, x in unlabeled.items()}
    )
    assert len(reads) == len(unlabeled) * cap  # a dataset: not one item more
    with pytest.raises(ValueError, match=r"max_samples_per_task \(None or a positive int\) must be in \[1, inf\]"):
        MOMAMerger(pre, experts, heads, max_samples_per_task=0).fit(unlabeled)


def test_a_whole_training_set_as_fit_input_gets_a_warning(problem, unlabeled):
    pre, experts, heads, _ = problem
    big = {t: x[:1].expand(10_001, *x.shape[1:]) for t, x in unlabeled.items()}
    with pytest.warns(UserWarning, match=r"fit read every fit input of task\(s\) \{'task0': 10001"):
        MOMAMerger(pre, experts, heads, n_steps=1, random_state=0).fit(big)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("missing task", "task"),
        ("wrong channels", "cannot take inputs of shape"),
        ("head width", "expects 3 input features"),
    ],
)
def test_fit_checks_data_and_heads_before_reading_any_expert_checkpoint(problem, unlabeled, bad, match):
    pre, experts, heads, _ = problem
    calls = []
    X = dict(unlabeled)
    heads = dict(heads)
    t0 = next(iter(X))
    if bad == "missing task":
        del X[t0]
    elif bad == "wrong channels":
        X[t0] = X[t0][:, :1]  # one channel of three
    else:
        heads[t0] = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):
        MOMAMerger(pre, counting_loaders(experts, calls), heads, n_steps=1).fit(X)
    assert calls == []  # no checkpoint was read


def test_fit_checks_the_heads_before_reading_the_fit_data(problem, unlabeled):
    pre, experts, heads, _ = problem
    heads = {t: copy.deepcopy(h) for t, h in heads.items()}
    t0 = next(iter(heads))
    with torch.no_grad():
        next(heads[t0].parameters()).fill_(float("nan"))
    read = []

    def batches(x):
        for i in range(0, len(x), 4):
            read.append(i)
            yield x[i : i + 4]

    with pytest.raises(ValueError, match="NaN|non-finite|finite"):
        MOMAMerger(pre, experts, heads, n_steps=1).fit({t: batches(x) for t, x in unlabeled.items()})
    assert read == []
