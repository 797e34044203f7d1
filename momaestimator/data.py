"""Per-task inputs: :class:`TaskSamples` and the conversion of what users pass into per-task batches.

Users hold their data as ``{task: DataLoader | Dataset | Tensor | ndarray}``; model selection
needs one indexable container it can split. :class:`TaskSamples` is that container: a lazy
view of ``(task, sample)`` pairs over the per-task storage, which indexing never copies (the
trick skorch's ``SliceDataset`` uses).
"""

from __future__ import annotations

import itertools
import numbers
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler

from .merging.task_vectors import string_keyed

__all__ = [
    "TaskSamples",
    "as_label_array",
    "iter_task_batches",
    "check_positional_labels",
    "materialize_inputs",
    "model_inputs",
    "n_samples",
    "split_inputs_and_labels",
    "task_keyed",
]


# names a ModuleDict cannot hold as keys (torch refuses a key that shadows an attribute)
_MODULE_DICT_ATTRIBUTES = frozenset(dir(torch.nn.ModuleDict()))


def task_keyed(mapping: Mapping, name: str) -> dict:
    """``{str(task): value}``, refusing two keys that name the same task (``0`` and ``"0"``).

    Task names are strings everywhere (``tasks_``, the merged model's heads); other keys are
    converted with ``str``, which must not merge two tasks into one.

    Parameters
    ----------
    mapping : Mapping
        ``{task: value}``.
    name : str
        How error messages call ``mapping``.

    Returns
    -------
    dict of str to object

    Raises
    ------
    ValueError
        If two keys have the same string form, or a name is empty, contains ``"."`` or is an
        attribute of ``torch.nn.ModuleDict`` such as ``"train"`` (a task names its head in one).

    Examples
    --------
    >>> task_keyed({0: "a", "b": "c"}, "X")
    {'0': 'a', 'b': 'c'}
    """
    for key in mapping:
        task = str(key)
        if not task or "." in task:
            raise ValueError(
                f"{name} has the task name {key!r}: a task name must be non-empty and contain no '.' "
                "(it names the task's head in the merged model's torch ModuleDict)"
            )
        if task in _MODULE_DICT_ATTRIBUTES:
            raise ValueError(
                f"{name} has the task name {key!r}, which is an attribute of torch's ModuleDict (like "
                "'train', 'eval', 'keys'); the merged model keeps its heads in one, so rename the task"
            )
    return string_keyed(mapping, name)


def _to_tensor(x, *, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        if x.dtype == object:
            raise TypeError(f"{what} is an object array; expected a numeric array")
        with warnings.catch_warnings():  # a read-only array: the tensor is only ever read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], (torch.Tensor, np.ndarray)):
        return _stack([_to_tensor(v, what=what) for v in x], what)
    raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _sample_array(x, what: str):
    """``x`` as a tensor or an array with samples on its first axis (a ``TypeError`` otherwise)."""
    if isinstance(x, torch.Tensor):
        arr = x
    elif isinstance(x, (Dataset, DataLoader)) or x is None:
        raise TypeError(
            f"{what} is {'None' if x is None else 'a ' + type(x).__name__}; expected an array or tensor "
            "(build TaskSamples.from_datasets for datasets)"
        )
    else:
        arr = np.asarray(x)
    if arr.ndim == 0 or (isinstance(arr, np.ndarray) and arr.dtype == object):
        raise TypeError(f"{what} is a {type(x).__name__}; expected an array or tensor with one sample per row")
    return arr


def _stack(parts: list, what: str) -> torch.Tensor:
    """``torch.stack`` of samples, or an error naming ``what`` when their shapes differ."""
    shapes = sorted({tuple(v.shape) for v in parts})
    if len(shapes) > 1:
        raise ValueError(f"{what} holds samples of different shapes {shapes[:3]}; expected one shape for all")
    return torch.stack(parts)


def _label_value(y, what: str):
    """One sample's label as a Python number (whether it is a class of the head is checked where it is scored)."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    if isinstance(y, np.ndarray):
        if y.size != 1:
            raise ValueError(f"{what} has shape {y.shape}; expected one class index per sample (not one-hot)")
        y = y.reshape(()).item()
    if not isinstance(y, numbers.Real):
        raise TypeError(f"{what} is a {type(y).__name__} ({y!r}); expected a class index (an integer)")
    return y


def _split_item(item):
    """A dataset item or loader batch is ``x`` or ``(x, y, ...)``."""
    if isinstance(item, (tuple, list)):
        if len(item) == 0:
            raise ValueError("got an empty item from a dataset/loader")
        return item[0], (item[1] if len(item) > 1 else None)
    if isinstance(item, Mapping):
        for xk in ("x", "image", "images", "input", "inputs", "pixel_values"):
            if xk in item:
                yk = next((k for k in ("y", "label", "labels", "target", "targets") if k in item), None)
                return item[xk], (item[yk] if yk else None)
        raise ValueError(f"cannot find the inputs in a dict item with keys {sorted(item)}")
    return item, None


class TaskSamples:
    """A lazy, indexable view of ``(task, sample)`` pairs over per-task data.

    ``len(ts)`` counts samples over all tasks; ``ts.shape == (len(ts),)`` so scikit-learn's
    splitters and ``GridSearchCV`` can index it; integer, boolean, slice and array indexing
    return a new :class:`TaskSamples` over the same storage (no copy of any input).

    Build it with :meth:`from_datasets` or :meth:`from_arrays`.

    Parameters
    ----------
    storage : dict of str to object
        Per task, an indexable of inputs (array, tensor) or a ``Dataset`` whose items are
        ``x`` or ``(x, y)``.
    labels : dict of str to array-like, optional
        Per task, labels aligned with ``storage`` (for arrays); datasets carry their own.
    task_ids, sample_ids : numpy.ndarray, optional
        The view: for sample ``i``, its task number (into :attr:`tasks`) and its index in that
        task's storage. Defaults to every sample of every task, task by task.

    Examples
    --------
    >>> import numpy as np
    >>> ts = TaskSamples.from_arrays({"a": np.zeros((4, 2)), "b": np.ones((2, 2))}, {"a": [0, 1, 0, 1], "b": [1, 1]})
    >>> len(ts), ts.shape, ts.tasks
    (6, (6,), ['a', 'b'])
    >>> sub = ts[[0, 5]]
    >>> sub.task_ids.tolist(), sub.targets().tolist()
    ([0, 1], [0, 1])
    """

    def __init__(self, storage, labels=None, task_ids=None, sample_ids=None):
        if not isinstance(storage, Mapping):
            raise TypeError(f"storage must be a dict {{task: samples}}, got {type(storage).__name__}")
        if labels is not None and not isinstance(labels, Mapping):
            raise TypeError(f"labels must be a dict {{task: labels}} or None, got {type(labels).__name__}")
        self._storage = task_keyed(storage, "storage")
        self._labels = task_keyed(labels or {}, "labels")
        self.tasks = list(self._storage)
        sizes = [len(self._storage[t]) for t in self.tasks]
        for t, lab in self._labels.items():
            if t not in self._storage:
                raise ValueError(f"labels name task {t!r}, which storage does not hold (tasks: {self.tasks})")
            if len(lab) != len(self._storage[t]):
                raise ValueError(
                    f"labels[{t!r}] has {len(lab)} entries for {len(self._storage[t])} samples: one label per sample"
                )
        if (task_ids is None) != (sample_ids is None):
            raise ValueError("give task_ids and sample_ids together (or neither, for every sample)")
        if task_ids is None:
            task_ids = np.repeat(np.arange(len(self.tasks)), sizes)
            sample_ids = np.concatenate([np.arange(n) for n in sizes]) if sizes else np.zeros(0, int)
        self.task_ids = np.asarray(task_ids, dtype=np.int64).reshape(-1)
        self.sample_ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        if len(self.task_ids) != len(self.sample_ids):
            raise ValueError(f"task_ids has {len(self.task_ids)} entries, sample_ids {len(self.sample_ids)}")
        if len(self.task_ids) and (self.task_ids.min() < 0 or self.task_ids.max() >= len(self.tasks)):
            raise ValueError(f"task_ids must lie in [0, {len(self.tasks)}) (positions in {self.tasks})")
        if len(self.sample_ids):
            limits = np.asarray(sizes, dtype=np.int64)[self.task_ids]
            if (self.sample_ids < 0).any() or (self.sample_ids >= limits).any():
                raise ValueError("sample_ids must index each task's samples (0 <= id < that task's sample count)")

    @classmethod
    def from_datasets(cls, datasets):
        """From ``{task: torch Dataset}`` whose items are ``x`` or ``(x, y)``.

        Parameters
        ----------
        datasets : dict of str to torch.utils.data.Dataset
            One map-style dataset per task; labels, when present, come from its items.

        Returns
        -------
        TaskSamples

        Examples
        --------
        >>> import torch
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
        >>> TaskSamples.from_datasets({"a": ds}).targets().tolist()
        [0, 1, 1]
        """
        if not isinstance(datasets, Mapping):
            raise TypeError(f"datasets must be a dict {{task: Dataset}}, got {type(datasets).__name__}")
        for t, ds in datasets.items():
            if not (hasattr(ds, "__getitem__") and hasattr(ds, "__len__")):
                raise TypeError(f"datasets[{t!r}] must be a map-style Dataset, got {type(ds).__name__}")
        return cls(task_keyed(datasets, "datasets"))

    @classmethod
    def from_arrays(cls, inputs, labels=None):
        """From ``{task: array or tensor of inputs}`` and optional ``{task: labels}``.

        Parameters
        ----------
        inputs : dict of str to array-like or torch.Tensor
            Per task, the inputs (first axis: samples). Arrays are kept as they are, not copied.
        labels : dict of str to array-like, optional
            Per task, one label per input; the same tasks as ``inputs``.

        Returns
        -------
        TaskSamples

        Examples
        --------
        >>> import torch
        >>> len(TaskSamples.from_arrays({"a": torch.zeros(3, 2)}))
        3
        """
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be a dict {{task: array}}, got {type(inputs).__name__}")
        storage = {t: _sample_array(x, f"inputs[{t!r}]") for t, x in task_keyed(inputs, "inputs").items()}
        lab = None
        if labels is not None:
            if not isinstance(labels, Mapping):
                raise TypeError(f"labels must be a dict {{task: labels}}, got {type(labels).__name__}")
            lab = {
                t: as_label_array(_sample_array(v, f"labels[{t!r}]")) for t, v in task_keyed(labels, "labels").items()
            }
            missing = sorted(set(storage) - set(lab))
            extra = sorted(set(lab) - set(storage))
            if missing or extra:
                raise ValueError(f"labels must name the same tasks as inputs; missing: {missing}, extra: {extra}")
            for t in storage:
                if lab[t].ndim != 1:
                    raise ValueError(
                        f"labels[{t!r}] has shape {lab[t].shape}; expected one class index per input (1-D), "
                        "e.g. labels.argmax(1) for one-hot labels"
                    )
                if len(lab[t]) != len(storage[t]):
                    raise ValueError(
                        f"task {t!r}: {len(lab[t])} labels for {len(storage[t])} inputs; expected one label per input"
                    )
        return cls(storage, lab)

    def __len__(self) -> int:
        return len(self.task_ids)

    @property
    def shape(self) -> tuple[int]:
        """``(len(self),)``: one entry per (task, sample) pair, as scikit-learn expects."""
        return (len(self),)

    @property
    def ndim(self) -> int:
        """Always 1."""
        return 1

    def __getitem__(self, key):
        if isinstance(key, tuple) and 1 <= len(key) <= 2 and (len(key) == 1 or key[1] is Ellipsis):
            key = key[0]  # ``ts[key, ...]``: how scikit-learn's ``_safe_indexing`` indexes array-likes
        if isinstance(key, (np.ndarray, torch.Tensor)) and key.ndim == 0:
            key = key.item()  # a 0-d integer array is one index
        if isinstance(key, (bool, np.bool_)):
            raise IndexError("TaskSamples takes a boolean mask (one entry per sample), not a single boolean")
        if isinstance(key, (int, np.integer)):
            key = [int(key)]
        if isinstance(key, tuple):
            raise IndexError("TaskSamples is 1-D: index it with an int, slice, boolean mask or integer array")
        return TaskSamples(self._storage, self._labels, self.task_ids[key], self.sample_ids[key])

    def __repr__(self) -> str:
        counts = np.bincount(self.task_ids, minlength=len(self.tasks))
        return "TaskSamples(" + ", ".join(f"{t}={c}" for t, c in zip(self.tasks, counts)) + ")"

    def indices_by_task(self) -> dict[str, np.ndarray]:
        """``{task: storage indices}`` for every task present in this view, in view order."""
        return {t: self.sample_ids[self.task_ids == i] for i, t in enumerate(self.tasks) if (self.task_ids == i).any()}

    def positions_by_task(self) -> dict[str, np.ndarray]:
        """``{task: positions in this view}`` for every task present."""
        return {t: np.flatnonzero(self.task_ids == i) for i, t in enumerate(self.tasks) if (self.task_ids == i).any()}

    def _item(self, task, i):
        store = self._storage[task]
        if isinstance(store, (np.ndarray, torch.Tensor)):
            return store[i], (self._labels[task][i] if task in self._labels else None)
        return _split_item(store[int(i)])

    def task_batch(self, task: str, idx, *, with_labels: bool = True):
        """Inputs and labels of ``task`` at storage indices ``idx``, reading each dataset item once.

        Parameters
        ----------
        task : str
            A task name.
        idx : array-like of int
            Indices into that task's storage.
        with_labels : bool, default=True
            Also return the labels (``None`` when the data has none); ``False`` never reads them.

        Returns
        -------
        x : torch.Tensor
        y : numpy.ndarray or None
        """
        store = self._storage[task]
        if isinstance(store, (np.ndarray, torch.Tensor)):
            return self.task_inputs(task, idx), (self.task_labels(task, idx) if with_labels else None)
        items = [(i, self._item(task, i)) for i in idx]
        x = _stack([_to_tensor(x, what=f"task {task!r} item {i}") for i, (x, _) in items], f"task {task!r}")
        if not with_labels or any(y is None for _, (_, y) in items):
            return x, None
        return x, np.asarray([_label_value(y, f"the label of task {task!r} item {i}") for i, (_, y) in items])

    def task_inputs(self, task: str, idx) -> torch.Tensor:
        """Stacked inputs of ``task`` at storage indices ``idx``.

        Parameters
        ----------
        task : str
            A task name.
        idx : array-like of int
            Indices into that task's storage (see :meth:`indices_by_task`).

        Returns
        -------
        torch.Tensor
        """
        store = self._storage[task]
        if isinstance(store, np.ndarray):
            return torch.from_numpy(np.ascontiguousarray(store[idx]))
        if isinstance(store, torch.Tensor):
            return store[torch.as_tensor(idx, dtype=torch.long)].detach()
        return self.task_batch(task, idx, with_labels=False)[0]

    def task_labels(self, task: str, idx):
        """Labels of ``task`` at storage indices ``idx``, or ``None`` when the data has none.

        Parameters
        ----------
        task : str
            A task name.
        idx : array-like of int
            Indices into that task's storage.

        Returns
        -------
        numpy.ndarray or None
        """
        store = self._storage[task]
        if isinstance(store, (np.ndarray, torch.Tensor)):
            return np.asarray(self._labels[task])[idx] if task in self._labels else None
        ys = [self._item(task, i)[1] for i in idx]
        if any(y is None for y in ys):
            return None
        return np.asarray([_label_value(y, f"the label of task {task!r} item {i}") for i, y in zip(idx, ys)])

    def stored_targets(self):
        """Labels aligned with this view if every task's labels are stored arrays, else ``None``.

        Unlike :meth:`targets`, never reads a dataset item (splitters call it to stratify).

        Returns
        -------
        numpy.ndarray or None
        """
        if any(t not in self._labels for t in self.tasks):
            return None
        return self._aligned(
            {
                task: np.asarray(self._labels[task])[self.sample_ids[pos]]
                for task, pos in self.positions_by_task().items()
            }
        )

    def targets(self) -> np.ndarray:
        """Labels aligned with this view (raises ``ValueError`` when the data has none)."""
        parts = {}
        for task, pos in self.positions_by_task().items():
            labels = self.task_labels(task, self.sample_ids[pos])
            if labels is None:
                raise ValueError(f"task {task!r} has no labels: build TaskSamples with labels to score")
            parts[task] = labels
        return self._aligned(parts)

    def _aligned(self, parts: dict) -> np.ndarray:
        """Per-task label arrays placed at their tasks' positions in this view, in their common dtype
        (float labels stay floats: ``check_class_labels`` refuses non-whole ones, none is truncated).
        """
        dtype = np.result_type(*parts.values()) if parts else np.int64
        out = np.empty(len(self), dtype=dtype)
        for task, pos in self.positions_by_task().items():
            out[pos] = parts[task]
        return out


def split_inputs_and_labels(X, y=None, *, name="X"):
    """Normalise the user's ``X`` (and ``y``) into ``{task: source}`` plus ``{task: labels or None}``.

    A source is something :func:`iter_task_batches` can read: a tensor/array, a Dataset, a DataLoader,
    or a ``(TaskSamples, indices)`` pair.

    Parameters
    ----------
    X : dict or TaskSamples
        ``{task: DataLoader | Dataset | Tensor | ndarray}``, ``{task: (inputs, labels)}``, or a
        :class:`TaskSamples`.
    y : dict of str to array-like, or array-like, optional
        Labels not carried by ``X``: ``{task: labels}`` for a dict, an array aligned with a
        :class:`TaskSamples`.
    name : str, default="X"
        How error messages call ``X``.

    Returns
    -------
    sources : dict of str to object
    labels : dict of str to numpy.ndarray or None

    Examples
    --------
    >>> import numpy as np
    >>> sources, labels = split_inputs_and_labels({"a": (np.zeros((2, 3)), [0, 1]), "b": np.ones((1, 3))})
    >>> sorted(sources), labels["a"].tolist(), labels["b"]
    (['a', 'b'], [0, 1], None)
    """
    if isinstance(X, TaskSamples):
        sources, labels = {}, {}
        if isinstance(y, Mapping):
            raise TypeError(
                f"y must be an array with one label per sample of {name} (a TaskSamples), got a dict; "
                "or build the TaskSamples with its labels and leave y out"
            )
        y_arr = None if y is None else as_label_array(y)
        if y_arr is not None and len(y_arr) != len(X):
            raise ValueError(f"y has {len(y_arr)} labels for {len(X)} samples in {name}; expected one per sample")
        for task, pos in X.positions_by_task().items():
            sources[task] = (X, X.sample_ids[pos])
            labels[task] = y_arr[pos] if y_arr is not None else None
        if not sources:
            raise ValueError(f"{name} is an empty TaskSamples: it holds no sample of any task")
        return sources, labels
    if not isinstance(X, Mapping):
        raise TypeError(
            f"{name} must be a dict {{task: DataLoader | Dataset | Tensor | ndarray}} or a TaskSamples, "
            f"got {type(X).__name__}"
        )
    sources, labels = {}, {}
    if y is not None and not isinstance(y, Mapping):
        raise TypeError(f"y must be None or a dict {{task: labels}} when {name} is a dict, got {type(y).__name__}")
    y = None if y is None else task_keyed(y, "y")
    for task, src in task_keyed(X, name).items():
        lab = None
        if isinstance(src, tuple) and len(src) == 2 and not isinstance(src[0], (int, float)):
            src, lab = src
        if isinstance(src, (str, bytes, Mapping)):
            raise TypeError(
                f"{name}[{task!r}] is a {type(src).__name__}; expected a DataLoader, Dataset, Tensor or ndarray"
            )
        if (
            not isinstance(src, (torch.Tensor, np.ndarray, Dataset, DataLoader))
            and not (hasattr(src, "__getitem__") and hasattr(src, "__len__"))
            and not hasattr(src, "__iter__")
        ):
            raise TypeError(
                f"{name}[{task!r}] must be a DataLoader, Dataset, Tensor or ndarray, got {type(src).__name__}"
            )
        if y is not None and task in y:
            lab = y[task]
        sources[task] = src
        labels[task] = None if lab is None else as_label_array(lab)
    if not sources:
        raise ValueError(f"{name} is empty: name at least one task")
    return sources, labels


def as_label_array(labels) -> np.ndarray:
    """Labels as a NumPy array, from a list, an array or a tensor on any device (CUDA included).

    Parameters
    ----------
    labels : array-like or torch.Tensor

    Returns
    -------
    numpy.ndarray

    Examples
    --------
    >>> import torch
    >>> as_label_array(torch.tensor([1, 0])), as_label_array([2, 3])
    (array([1, 0]), array([2, 3]))
    """
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu()
        if labels.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16
            labels = labels.float()
        return labels.numpy()
    return np.asarray(labels)


def iter_task_batches(source, labels=None, *, batch_size=256, task="?", with_labels=True):
    """Yield ``(x, y)`` batches (``y`` may be ``None``) from one task's source.

    Parameters
    ----------
    source : object
        A tensor or array, a Dataset (map-style or iterable: its items are samples), a DataLoader
        or any other iterable of batches such as a generator (its batching is kept), or a
        ``(TaskSamples, indices)`` pair, as returned by :func:`split_inputs_and_labels`.
    labels : array-like, optional
        Labels aligned with ``source``, overriding any the source carries.
    batch_size : int, default=256
        Batch size for tensors, arrays, datasets and ``TaskSamples``.
    task : str, default="?"
        The task name, for error messages and ``TaskSamples`` look-ups.
    with_labels : bool, default=True
        ``False``: yield ``y = None`` without reading or checking any label (fitting needs none).

    Raises
    ------
    ValueError
        If ``labels`` are given for a DataLoader whose sampler reorders its dataset (positions
        cannot match), or their number differs from the samples read.

    Yields
    ------
    x : torch.Tensor
    y : numpy.ndarray or None

    Examples
    --------
    >>> import numpy as np, torch
    >>> labels = np.array([0, 1, 0, 1, 0])
    >>> [(x.shape[0], y.tolist()) for x, y in iter_task_batches(torch.zeros(5, 2), labels, batch_size=3)]
    [(3, [0, 1, 0]), (2, [1, 0])]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not with_labels:
        labels = None
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], TaskSamples):
        ts, idx = source
        _check_label_count(labels, len(idx), task)
        for i in range(0, len(idx), batch_size):
            part = idx[i : i + batch_size]
            x, y = ts.task_batch(task, part, with_labels=with_labels and labels is None)
            yield x, (labels[i : i + batch_size] if labels is not None else y)
        return
    if isinstance(source, (torch.Tensor, np.ndarray)):
        x_all = _to_tensor(source, what=f"X[{task!r}]")
        _check_label_count(labels, len(x_all), task)  # before the first batch
        for i in range(0, len(x_all), batch_size):
            yield x_all[i : i + batch_size], (labels[i : i + batch_size] if labels is not None else None)
        return
    if isinstance(source, IterableDataset):  # items are samples, as a DataLoader would see them
        items, start = iter(source), 0
        while chunk := [_split_item(it) for it in itertools.islice(items, batch_size)]:
            yield _stack_items(chunk, labels, start, task, with_labels)
            start += len(chunk)
        _check_label_count(labels, start, task)
        return
    # a DataLoader or any other iterable of batches (a generator, a custom loader)
    if isinstance(source, DataLoader) or not (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
        if labels is not None:
            check_positional_labels(source, labels, task)
        offset = 0
        for batch in source:
            x, y = _split_item(batch)
            x = _to_tensor(x, what=f"a batch of X[{task!r}]")
            if labels is not None:
                y = labels[offset : offset + len(x)]
            elif not with_labels:
                y = None
            offset += len(x)
            yield x, (None if y is None else as_label_array(y))
        _check_label_count(labels, offset, task)
        return
    # map-style dataset
    n = len(source)
    for i in range(0, n, batch_size):
        items = [_split_item(source[j]) for j in range(i, min(n, i + batch_size))]
        yield _stack_items(items, labels, i, task, with_labels)
    _check_label_count(labels, n, task)


def n_samples(source):
    """The number of samples of an array, tensor or map-style dataset; ``None`` for loaders and iterables.

    Parameters
    ----------
    source : object
        One task's source, as :func:`split_inputs_and_labels` returns it.

    Returns
    -------
    int or None

    Examples
    --------
    >>> import numpy as np
    >>> n_samples(np.zeros((3, 2))), n_samples(iter([]))
    (3, None)
    """
    if isinstance(source, (torch.Tensor, np.ndarray)):
        return len(source)
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], TaskSamples):
        return len(source[1])
    if isinstance(source, (DataLoader, IterableDataset, tuple)) or not hasattr(source, "__len__"):
        return None
    return len(source)


def check_positional_labels(loader, labels, task) -> None:
    """Refuse labels given apart from a DataLoader they cannot line up with (before any work).

    Labels given apart from a loader are matched to its samples by position. A sampler that
    reorders the dataset (``shuffle=True``, a random or weighted sampler) breaks that; a loader
    over a sized dataset with the default sequential order is checked for the label count.

    Parameters
    ----------
    loader : object
        The task's source (only DataLoaders are checked).
    labels : array-like
        The labels given for it.
    task : str
        The task, for error messages.

    Raises
    ------
    ValueError
        If the order cannot match or the count differs.

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> check_positional_labels(DataLoader(torch.zeros(4, 2), shuffle=True), [0, 1, 0, 1], "a")
    Traceback (most recent call last):
    ...
    ValueError: task 'a': labels are given apart from a DataLoader whose sampler is RandomSampler; ...
    """
    if not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return
    sampler = loader.batch_sampler.sampler if loader.batch_sampler is not None else loader.sampler
    if not isinstance(sampler, SequentialSampler):
        raise ValueError(
            f"task {task!r}: labels are given apart from a DataLoader whose sampler is {type(sampler).__name__}; "
            "they are matched to its samples by position, which a reordering sampler breaks. Let the "
            "loader yield (x, y) batches, or use shuffle=False"
        )
    if loader.batch_sampler is not None and type(loader.batch_sampler) is BatchSampler:
        n = len(sampler)
        if loader.drop_last:
            n -= n % loader.batch_size
        if len(labels) != n:
            raise ValueError(f"task {task!r}: {len(labels)} labels for the {n} samples its DataLoader yields")


def _check_label_count(labels, n_read: int, task) -> None:
    if labels is not None and len(labels) != n_read:
        raise ValueError(f"task {task!r}: {len(labels)} labels for the {n_read} samples read from its data")


def _stack_items(items, labels, start, task, with_labels=True):
    """One batch from ``(x, y)`` dataset items starting at position ``start``."""
    x = _stack([_to_tensor(it[0], what=f"X[{task!r}][{j}]") for j, it in enumerate(items, start)], f"X[{task!r}]")
    if labels is not None:
        y = labels[start : start + len(items)]
    elif with_labels and all(it[1] is not None for it in items):
        y = np.asarray([_label_value(it[1], f"the label of X[{task!r}][{j}]") for j, it in enumerate(items, start)])
    else:
        y = None
    return x, y


def materialize_inputs(source, *, task: str, dtype=None, device=None, max_samples=None) -> torch.Tensor:
    """All inputs of one task as one tensor (fit data is small: a few samples per class).

    Parameters
    ----------
    source : object
        Anything :func:`iter_task_batches` reads.
    task : str
        The task name, for error messages.
    dtype : torch.dtype, optional
        The encoder's floating dtype: inputs are converted to it (to float32 without one), except
        ``int32``/``int64`` ones (token ids), which keep their dtype (:func:`model_inputs`).
    device : str or torch.device, optional
        Move to this device.
    max_samples : int, optional
        Keep the first this many samples and stop reading the source there.

    Returns
    -------
    torch.Tensor

    Raises
    ------
    ValueError
        If the source is empty or holds NaN or infinite values.

    Examples
    --------
    >>> import numpy as np
    >>> materialize_inputs(np.zeros((3, 2), dtype=np.uint8), task="a").dtype
    torch.float32
    """
    if isinstance(source, (torch.Tensor, np.ndarray)):
        # the caller's own tensor (a view of the array), not a copy: fit data is only read
        x = _to_tensor(source, what=f"X[{task!r}]")
        if max_samples is not None and x.ndim:
            x = x[:max_samples]
        parts = [x] if x.ndim and len(x) else []
    else:
        parts, n = [], 0
        batch = 256 if max_samples is None else max(1, min(256, max_samples))  # datasets: read no extra item
        for x, _ in iter_task_batches(source, batch_size=batch, task=task, with_labels=False):
            parts.append(x)
            n += len(x)
            if max_samples is not None and n >= max_samples:
                break  # read no further
        x = torch.cat(parts)[:max_samples] if parts else None
    if not parts or len(x) == 0:
        raise ValueError(f"X[{task!r}] is empty: fit needs at least one unlabeled sample per task")
    if not _all_finite(x):
        raise ValueError(f"X[{task!r}] contains NaN or infinite values")
    return model_inputs(x, dtype=dtype, device=device)


def model_inputs(x: torch.Tensor, *, dtype=None, device=None) -> torch.Tensor:
    """Inputs as a model takes them: ``int32``/``int64`` (indices, such as token ids) as they are,
    every other type (floats, and ``uint8``/``int8``/``int16``/``bool`` pixel data) in ``dtype``
    (default float32 for the integers).

    Parameters
    ----------
    x : torch.Tensor
    dtype : torch.dtype, optional
        The model's floating dtype.
    device : str or torch.device, optional

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> import torch
    >>> model_inputs(torch.zeros(2, dtype=torch.uint8)).dtype, model_inputs(torch.zeros(2, dtype=torch.long)).dtype
    (torch.float32, torch.int64)
    """
    if x.is_floating_point():
        return x.to(device=device, dtype=dtype)
    if x.dtype in INDEX_DTYPES:
        return x.to(device=device)
    return x.to(device=device, dtype=dtype or torch.float32)


INDEX_DTYPES = (torch.int32, torch.int64)


def index_input_hint(x: torch.Tensor) -> str:
    """For an error on inputs :func:`model_inputs` passed as integers, what to do if they are images."""
    if x.dtype not in INDEX_DTYPES:
        return ""
    return (
        f"; the inputs are {str(x.dtype).removeprefix('torch.')}, which reach the encoder as integers "
        "(token ids): if they are images, give them as floats or uint8"
    )


def _all_finite(x: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """``torch.isfinite(x).all()`` over slices of about ``chunk`` entries: no mask the size of the data."""
    rows = max(1, chunk // max(1, x[0].numel()))
    return all(bool(torch.isfinite(x[i : i + rows]).all()) for i in range(0, len(x), rows))
