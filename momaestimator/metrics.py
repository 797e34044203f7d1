"""Per-task accuracy as a scikit-learn scorer.

``MOMAMerger.score`` returns one float (the unweighted mean of per-task accuracies), which is what
``scoring=None`` uses. :func:`per_task_accuracy_scorer` returns the mean *and* every task's
accuracy as a dict, so a model-selection search reports one column per task.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from ._validation import inputs_blamed
from .data import (
    check_positional_labels,
    index_input_hint,
    iter_task_batches,
    model_inputs,
    n_samples,
    split_inputs_and_labels,
    task_keyed,
)

__all__ = ["accuracy_per_task", "check_class_labels", "check_scoring_inputs", "per_task_accuracy_scorer"]


def per_task_accuracy_scorer(estimator, X, y=None):
    """Score a fitted merger with its mean and per-task top-1 accuracy, as a multi-metric scorer.

    Pass it as ``scoring=`` to ``GridSearchCV``, ``cross_validate`` and friends; with
    ``refit="mean"`` a search picks the candidate with the best mean accuracy, and its
    ``cv_results_`` get ``mean_test_mean`` plus one ``mean_test_<task>`` column per task.

    Parameters
    ----------
    estimator : MOMAMerger
        A fitted merger (anything with ``tasks_`` and ``score_per_task(X, y)``), a ``Pipeline``
        ending in one (``X`` goes through the steps before it), or a fitted search over one (its
        ``best_estimator_``; nested cross-validation).
    X : TaskSamples or dict
        Labelled evaluation data, as accepted by ``estimator.score_per_task``.
    y : array-like or dict, optional
        Labels when ``X`` does not carry them.

    Returns
    -------
    dict of str to float
        ``"mean"``: the unweighted mean over the tasks present in ``X`` (the same value as
        ``estimator.score(X, y)``), then one entry per task the merger was fitted on; a task
        absent from ``X`` gets ``nan`` so every call returns the same keys.

    Raises
    ------
    ValueError
        If a task is named ``"mean"`` (its column would collide with the mean's).
    TypeError
        If ``estimator`` holds no merger.

    Examples
    --------
    >>> from momaestimator import MOMAMerger, TaskSamples, per_task_accuracy_scorer, toy
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2, random_state=0)
    >>> X = TaskSamples.from_arrays({t: x for t, (x, _) in data.items()}, {t: y for t, (_, y) in data.items()})
    >>> merger = MOMAMerger(pre, experts, heads, n_steps=2, random_state=0).fit(X)
    >>> scores = per_task_accuracy_scorer(merger, X)
    >>> list(scores)
    ['mean', 'task0', 'task1']
    >>> scores["mean"] == merger.score(X)
    True
    """
    estimator, X = _scored_merger(estimator, X)
    tasks = list(getattr(estimator, "tasks_", None) or [])
    if "mean" in tasks:
        raise ValueError(
            "a task is named 'mean', which per_task_accuracy_scorer reserves for the mean over tasks; rename that task"
        )
    per_task = estimator.score_per_task(X, y)
    scores = {"mean": float(np.mean(list(per_task.values())))}
    for task in tasks or per_task:
        scores[task] = float(per_task.get(task, math.nan))
    return scores


def _scored_merger(estimator, X):
    """The merger inside ``estimator`` and its inputs: the last step of a ``Pipeline`` (``X`` through
    the steps before it), a fitted search's ``best_estimator_``.
    """
    if hasattr(estimator, "score_per_task"):
        return estimator, X
    steps = getattr(estimator, "steps", None)
    if isinstance(steps, list) and steps and hasattr(estimator, "named_steps"):
        for _, step in steps[:-1]:
            if step is not None and step != "passthrough":
                X = step.transform(X)
        return _scored_merger(steps[-1][1], X)
    best = getattr(estimator, "best_estimator_", None)
    if best is not None:
        return _scored_merger(best, X)
    raise TypeError(
        "per_task_accuracy_scorer scores a merger (an estimator with score_per_task, such as MOMAMerger), a "
        f"Pipeline ending in one, or a fitted search over one; got {type(estimator).__name__}"
    )


def check_class_labels(labels, task, *, n_classes=None) -> np.ndarray:
    """Labels as class indices (``int64``), or a ``ValueError`` naming the task and the problem.

    Parameters
    ----------
    labels : array-like
        One label per sample: integers, or floats holding whole numbers.
    task : str
        The task, for error messages.
    n_classes : int, optional
        The head's number of classes: labels must lie in ``[0, n_classes)``.

    Returns
    -------
    numpy.ndarray of int64

    Examples
    --------
    >>> check_class_labels([0.0, 2.0], "a").tolist()
    [0, 2]
    >>> check_class_labels([0, 3], "a", n_classes=3)
    Traceback (most recent call last):
    ...
    ValueError: task 'a': label 3 is not a class of its head (classes 0..2)
    """
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"task {task!r}: labels must be one class index per sample, got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or (arr != np.round(arr)).any():
            raise ValueError(f"task {task!r}: labels must be whole class indices, got non-integer values")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"task {task!r}: labels must be integer class indices, got {arr.dtype} values")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n_classes)] if n_classes is not None else arr[arr < 0]
    if len(bad):
        top = f" (classes 0..{n_classes - 1})" if n_classes is not None else ""
        raise ValueError(f"task {task!r}: label {int(bad[0])} is not a class of its head{top}")
    return arr


def check_scoring_inputs(X, y=None, tasks=None):
    """Split labelled inputs per task and check them before any model runs.

    Checks that every task is served, that given labels are class indices (their range is checked
    against each head while scoring), that their number matches a sized source's samples, and
    that labels given apart from a DataLoader can line up with its samples.

    Parameters
    ----------
    X, y
        Labelled inputs per task (see :meth:`momaestimator.MOMAMerger.score_per_task`).
    tasks : list of str, optional
        Tasks the model serves; other tasks in ``X`` raise ``ValueError``.

    Returns
    -------
    sources : dict of str to object
    labels : dict of str to numpy.ndarray or None
        As :func:`~momaestimator.data.split_inputs_and_labels` returns them.

    Raises
    ------
    ValueError
        Naming the task and the problem.

    Examples
    --------
    >>> import numpy as np
    >>> check_scoring_inputs({"a": np.zeros((3, 2))}, {"a": [0, 1]})
    Traceback (most recent call last):
    ...
    ValueError: task 'a': 2 labels for 3 inputs
    """
    sources, labels = split_inputs_and_labels(X, y)
    if isinstance(y, Mapping) and (unused := sorted(set(task_keyed(y, "y")) - set(sources))):
        warnings.warn(f"y has labels for tasks {unused} that X does not have; they are not used", stacklevel=3)
    if tasks is not None:
        unknown = [t for t in sources if t not in tasks]
        if unknown:
            raise ValueError(f"X names tasks {unknown} that the model does not serve; known: {list(tasks)}")
    for task, lab in labels.items():
        if lab is None:
            continue
        check_class_labels(lab, task)
        n = n_samples(sources[task])
        if n is not None and len(lab) != n:
            raise ValueError(f"task {task!r}: {len(lab)} labels for {n} inputs")
        check_positional_labels(sources[task], lab, task)
    return sources, labels


def accuracy_per_task(model, X, y=None, *, device="cpu", tasks=None, autocast_dtype=None) -> dict[str, float]:
    """Top-1 accuracy of ``model(x, task)`` on labelled per-task data.

    Parameters
    ----------
    model : torch.nn.Module
        Called as ``model(x, task)``; returns logits.
    X, y
        Labelled inputs per task (see :meth:`momaestimator.MOMAMerger.score_per_task`).
    device : str or torch.device, default="cpu"
    tasks : list of str, optional
        Tasks the model serves; other tasks in ``X`` raise ``ValueError``.
    autocast_dtype : torch.dtype, optional
        Run the model under ``torch.autocast`` in this dtype (models whose weights need it).

    Returns
    -------
    dict of str to float

    Examples
    --------
    >>> import torch
    >>> from momaestimator import LinearHead, MergedModel
    >>> from momaestimator.metrics import accuracy_per_task
    >>> model = MergedModel(torch.nn.Identity(), {"a": LinearHead(torch.eye(2), normalize=False)})
    >>> accuracy_per_task(model, {"a": (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), [0, 0])})
    {'a': 0.5}
    """
    sources, labels = check_scoring_inputs(X, y, tasks)
    return _accuracy_of_sources(model, sources, labels, device=device, autocast_dtype=autocast_dtype)


@torch.no_grad()
def _accuracy_of_sources(model, sources, labels, *, device="cpu", autocast_dtype=None) -> dict[str, float]:
    """:func:`accuracy_per_task` on inputs :func:`check_scoring_inputs` has split and checked."""
    dtype = next(model.parameters()).dtype
    out = {}
    for task, source in sources.items():
        correct = total = 0
        for x, lab in iter_task_batches(source, labels[task], task=task):
            if lab is None:
                raise ValueError(f"task {task!r} has no labels: pass (inputs, labels), a labelled loader, or y")
            x = model_inputs(x, dtype=dtype, device=device)  # uint8 images too: the model's dtype
            if not torch.isfinite(x).all():
                raise ValueError(f"X[{task!r}] contains NaN or infinite values")
            autocast = torch.autocast(x.device.type, autocast_dtype, enabled=autocast_dtype is not None)
            what = f"X[{task!r}]: the model cannot take inputs of shape {tuple(x.shape)}{index_input_hint(x)}"
            with inputs_blamed(what), autocast:
                logits = model(x, task)
            if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
                raise ValueError(
                    f"task {task!r}: the model returns logits of shape {tuple(logits.shape)} for {x.shape[0]} "
                    "inputs; expected (batch, classes) (does the encoder return (batch, features)?)"
                )
            pred = logits.argmax(-1).cpu()
            lab = torch.as_tensor(check_class_labels(lab, task, n_classes=logits.shape[-1]))
            if len(lab) != len(pred):
                raise ValueError(f"task {task!r}: {len(lab)} labels for {len(pred)} inputs")
            correct += int((pred == lab).sum())
            total += len(lab)
        if total == 0:
            raise ValueError(f"X[{task!r}] is empty: nothing to score")
        out[task] = correct / total
    return out
