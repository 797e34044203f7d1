"""Task-aware cross-validation: :class:`TaskKFold`.

A plain ``KFold`` on task-ordered data puts whole tasks into one fold, so a merger would be fitted
without some tasks and scored on tasks it never saw. :class:`TaskKFold` stratifies by task: every
fold holds ``1/n_splits`` of every task, in its train and its test part.
"""

from __future__ import annotations

import numbers

import numpy as np
from sklearn.model_selection import BaseCrossValidator
from sklearn.utils import check_random_state

__all__ = ["TaskKFold"]


class TaskKFold(BaseCrossValidator):
    """K-fold cross-validation stratified by task, for :class:`~momaestimator.TaskSamples`.

    Each task's samples are split into ``n_splits`` consecutive (or, with ``shuffle=True``,
    shuffled) blocks whose sizes differ by at most one — stratified by class within the task when
    labels are known (``y``, or labels stored in the :class:`~momaestimator.TaskSamples`): the
    task's samples are then dealt out class by class, so each block holds every class in
    proportion, even for data sorted by class; fold ``k`` tests on block ``k`` of every
    task and trains on the rest. So every fold's train and test part contain every task, each in
    proportion ``(n_splits - 1) / n_splits`` and ``1 / n_splits`` of that task's samples (up to
    rounding). The tasks whose size is not a multiple of ``n_splits`` give their spare samples to
    different folds in turn, so the folds' total sizes also differ by at most one.

    Parameters
    ----------
    n_splits : int, default=5
        Number of folds, at least 2. Every task needs at least ``n_splits`` samples.
    shuffle : bool, default=False
        Shuffle each task's samples before splitting them into blocks (never across tasks).
    random_state : int, RandomState instance or None, default=None
        Seeds the shuffling when ``shuffle=True``; must be ``None`` otherwise (as in ``KFold``).

    See Also
    --------
    sklearn.model_selection.StratifiedKFold : The same idea with class labels as strata.

    Examples
    --------
    >>> import numpy as np
    >>> from momaestimator import TaskSamples, TaskKFold
    >>> X = TaskSamples.from_arrays({"a": np.zeros((6, 2)), "b": np.zeros((3, 2))})
    >>> cv = TaskKFold(n_splits=3)
    >>> for train, test in cv.split(X):
    ...     print(test, X[test].task_ids)
    [0 1 6] [0 0 1]
    [2 3 7] [0 0 1]
    [4 5 8] [0 0 1]
    >>> cv.get_n_splits(X)
    3
    """

    def __init__(self, n_splits=5, *, shuffle=False, random_state=None):
        if not isinstance(n_splits, numbers.Integral) or isinstance(n_splits, bool):
            raise ValueError(f"n_splits must be an integer, got {n_splits!r} of type {type(n_splits).__name__}")
        if n_splits < 2:
            raise ValueError(f"TaskKFold needs at least 2 folds (train and test); got n_splits={n_splits}")
        if not isinstance(shuffle, (bool, np.bool_)):
            raise TypeError(f"shuffle must be True or False, got {shuffle!r}")
        if not shuffle and random_state is not None:
            raise ValueError(
                "random_state has no effect since shuffle is False: leave random_state=None or set shuffle=True"
            )
        self.n_splits = int(n_splits)
        self.shuffle = shuffle
        self.random_state = random_state

    def get_n_splits(self, X=None, y=None, groups=None):
        """Number of folds.

        Parameters
        ----------
        X, y, groups : ignored
            Accepted for API compatibility.

        Returns
        -------
        int
        """
        return self.n_splits

    def split(self, X, y=None, groups=None):
        """Yield ``(train, test)`` position arrays, each containing every task.

        Parameters
        ----------
        X : TaskSamples
            The samples to split (anything with a ``task_ids`` array works).
        y : array-like, optional
            Class labels aligned with ``X``: each task's folds are stratified by them (default:
            the labels stored in ``X``, if any).
        groups : ignored
            Tasks are the strata; group labels are not used.

        Yields
        ------
        train : numpy.ndarray of int
            Positions into ``X`` of the training part, dealt out task by task (each task's in
            increasing order), so that any first part of it (``learning_curve`` fits on growing
            prefixes) holds every task in proportion.
        test : numpy.ndarray of int
            Sorted positions into ``X`` of the test part.
        """
        task_ids = self._task_ids(X, y)  # validate eagerly on the first ``next``
        for train, test in super().split(X, y, groups):
            yield train[_interleaved_by_class(task_ids[train])], test

    @staticmethod
    def _task_ids(X, y=None):
        task_ids = getattr(X, "task_ids", None)
        if task_ids is None:
            raise TypeError(
                f"TaskKFold splits a TaskSamples (it needs each sample's task), got {type(X).__name__}; "
                "build one with TaskSamples.from_arrays or TaskSamples.from_datasets"
            )
        task_ids = np.asarray(task_ids)
        if y is not None and len(y) != len(task_ids):
            raise ValueError(f"y has {len(y)} entries for {len(task_ids)} samples in X")
        return task_ids

    def _iter_test_indices(self, X=None, y=None, groups=None):
        task_ids = self._task_ids(X, y)
        names = list(getattr(X, "tasks", []))
        labels = np.asarray(y) if y is not None else getattr(X, "stored_targets", lambda: None)()
        rng = check_random_state(self.random_state) if self.shuffle else None
        folds = [[] for _ in range(self.n_splits)]
        offset = 0  # which fold gets the next spare sample, carried across tasks
        for tid in np.unique(task_ids):
            pos = np.flatnonzero(task_ids == tid)
            if len(pos) < self.n_splits:
                name = names[tid] if 0 <= tid < len(names) else tid
                raise ValueError(
                    f"task {name!r} has {len(pos)} samples, fewer than n_splits={self.n_splits}: every fold "
                    "must test on every task; lower n_splits or give that task more samples"
                )
            if rng is not None:
                pos = pos[rng.permutation(len(pos))]
            if labels is not None:  # deal the classes out in turn: every block gets each class in proportion
                pos = pos[_interleaved_by_class(labels[pos])]
            base, extra = divmod(len(pos), self.n_splits)
            sizes = np.full(self.n_splits, base)
            sizes[(offset + np.arange(extra)) % self.n_splits] += 1
            offset = (offset + extra) % self.n_splits
            start = 0
            for k, size in enumerate(sizes):
                folds[k].append(pos[start : start + size])
                start += size
        for parts in folds:
            yield np.sort(np.concatenate(parts))


def _interleaved_by_class(labels) -> np.ndarray:
    """An order of ``labels``' positions that takes each class's samples in turn, largest share first.

    Sample ``j`` of a class of ``n_c`` samples goes to position ``(j + 0.5) / n_c`` on a common
    scale, so any block of consecutive positions holds each class in proportion to its size.
    """
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    rank = np.empty(len(labels))
    for c, n in enumerate(counts):
        members = np.flatnonzero(inverse == c)
        rank[members] = (np.arange(n) + 0.5) / n
    return np.lexsort((inverse, rank))
