"""Per-task accuracy as a scikit-learn scorer.

``MOMAMerger.score`` returns one float (the unweighted mean of per-task accuracies), which is what
``scoring=None`` uses. :func:`per_task_accuracy_scorer` returns the mean *and* every task's
accuracy as a dict, so a model-selection search reports one column per task.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["per_task_accuracy_scorer"]


def per_task_accuracy_scorer(estimator, X, y=None):
    """Score a fitted merger with its mean and per-task top-1 accuracy, as a multi-metric scorer.

    Pass it as ``scoring=`` to ``GridSearchCV``, ``cross_validate`` and friends; with
    ``refit="mean"`` a search picks the candidate with the best mean accuracy, and its
    ``cv_results_`` get ``mean_test_mean`` plus one ``mean_test_<task>`` column per task.

    Parameters
    ----------
    estimator : MOMAMerger
        A fitted merger (anything with ``tasks_`` and ``score_per_task(X, y)``).
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
