"""The estimator protocol every merging method of the benchmark shares.

A merger is a scikit-learn estimator built from ``(pretrained_encoder, finetuned_encoders, heads)``
with ``fit(X)`` on unlabeled per-task inputs, ``transform()`` returning a module with
``forward(x, task)``, ``score``/``score_per_task`` on labelled data, and ``extra_params_``: the
parameters its model needs at inference beyond one encoder plus the original heads.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import BaseEstimator, clone
from sklearn.utils.validation import check_is_fitted

from .. import _validation as V
from .._display import MODULE_PARAMS, ModuleSummaryReprMixin
from ..data import materialize_inputs, split_inputs_and_labels
from ..merging.fit import HeadSpec, teacher_targets
from ..merging.task_vectors import as_state_dict
from ..metrics import _accuracy_of_sources, check_scoring_inputs

__all__ = ["MergerBase", "count_parameters"]

MERGE_PARAMS = ("base", "scaling", "top_k", "merge")  # the base merge's settings, frozen by fit


def count_parameters(module) -> int:
    """Number of parameters of a module (shared tensors counted once).

    Parameters
    ----------
    module : torch.nn.Module

    Returns
    -------
    int

    Examples
    --------
    >>> import torch
    >>> count_parameters(torch.nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in module.parameters())


class MergerBase(ModuleSummaryReprMixin, BaseEstimator):
    """Shared plumbing: validation, module sharing on clone, scoring, teacher targets.

    Subclasses implement ``fit`` (setting fitted attributes, ending with ``_freeze_merge_params``)
    and ``transform()``. ``merge_params_`` records the base merge's settings (``base``,
    ``scaling``, ``top_k``, ``merge``, those the method has) as ``fit`` used them; ``transform``
    uses these, so ``set_params`` after ``fit`` waits for the next ``fit``.

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import MergerBase, TaskArithmetic
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> merger = TaskArithmetic(pre, experts, heads).fit()
    >>> isinstance(merger, MergerBase), sorted(merger.score_per_task(data))
    (True, ['task0', 'task1'])
    """

    _absorbs_rotations = False  # whether transform() folds a rotation into the heads' first weight

    def __sklearn_clone__(self):
        params = self.get_params(deep=False)
        return type(self)(**{k: (v if k in MODULE_PARAMS else clone(v, safe=False)) for k, v in params.items()})

    def _reset_fitted(self):
        """Forget every fitted attribute (public names ending in ``_``)."""
        for name in [k for k in vars(self) if k.endswith("_") and not k.startswith("_")]:
            delattr(self, name)

    def _freeze_merge_params(self):
        """Record the base merge's settings as ``fit`` used them (``merge_params_``)."""
        params = self.get_params(deep=False)
        self.merge_params_ = {k: params[k] for k in MERGE_PARAMS if k in params}

    def _merge_param(self, name, default=None):
        """A base-merge setting as fitted (so ``set_params`` after ``fit`` waits for the next fit)."""
        fitted = self.__dict__.get("merge_params_")
        if fitted is not None and name in fitted:
            return fitted[name]
        return getattr(self, name, default)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = False
        tags.input_tags.two_d_array = False
        tags.input_tags.dict = True
        return tags

    def _validated_models(self):
        if not isinstance(self.pretrained_encoder, torch.nn.Module):
            raise TypeError(
                f"pretrained_encoder must be a torch.nn.Module, got {type(self.pretrained_encoder).__name__}"
            )
        fts = V.check_task_dict(self.finetuned_encoders, "finetuned_encoders")
        heads = V.check_heads_dict(self.heads)
        tasks = V.check_same_tasks(finetuned_encoders=fts, heads=heads)

        pre = as_state_dict(self.pretrained_encoder, name="pretrained_encoder")
        V.check_state(pre, "pretrained_encoder")
        for t, m in fts.items():
            V.check_encoder_states(pre, as_state_dict(m), t, same_dtype=True)
        dtype = V.encoder_dtype(self.pretrained_encoder, pre)
        V.check_heads(heads, None, dtype, rotations=self._absorbs_rotations)
        return tasks, pre, fts, heads

    def _unlabeled(self, X, tasks, device, dtype):
        sources, _ = split_inputs_and_labels(X, None)
        V.check_same_tasks(finetuned_encoders=dict.fromkeys(tasks), X=sources)
        x = {t: materialize_inputs(sources[t], task=t, dtype=dtype, device=device) for t in tasks}
        V.check_sample_shapes(x, tasks)  # before any forward pass
        return x

    def _teacher(self, skeleton, ft_module, head, x, device):
        state = {k: v.to(device) for k, v in as_state_dict(ft_module).items()}
        return teacher_targets(skeleton, state, HeadSpec.of(head, device), x)

    def score_per_task(self, X, y=None) -> dict[str, float]:
        """Top-1 accuracy per task of the model :meth:`transform` returns.

        Parameters
        ----------
        X, y
            Labelled inputs per task, as for :meth:`momaestimator.MOMAMerger.score_per_task`.

        Returns
        -------
        dict of str to float
        """
        check_is_fitted(self, "tasks_")
        device = V.resolve_device(getattr(self, "device", "cpu"))
        sources, labels = check_scoring_inputs(X, y, self.tasks_)  # before the merge
        return _accuracy_of_sources(self.transform().to(device), sources, labels, device=device)

    def score(self, X, y=None) -> float:
        """Unweighted mean over tasks of :meth:`score_per_task`.

        Parameters
        ----------
        X, y
            As in :meth:`score_per_task`.

        Returns
        -------
        float
        """
        return float(np.mean(list(self.score_per_task(X, y).values())))
