"""Baselines that need no data: pretrained + heads, individual experts, and the base merges."""

from __future__ import annotations

import torch
from sklearn.utils.validation import check_is_fitted
from torch import nn

from .. import _validation as V
from ..merging.functional import clone_with_state
from ..merging.task_arithmetic import task_arithmetic, ties_merging, weight_averaging
from ..models import MergedModel
from .base import MergerBase, count_parameters

__all__ = ["IndividualExperts", "PretrainedHeads", "TaskArithmetic", "TiesMerging", "WeightAveraging"]


def _copy_heads(heads, tasks):
    return {t: clone_with_state(heads[t], {k: v.detach() for k, v in heads[t].state_dict().items()}) for t in tasks}


class _StateMerger(MergerBase):
    """A merger whose result is one encoder state dict (``_merged_state``) plus the original heads."""

    def fit(self, X=None, y=None):
        """Validate the models; these methods learn nothing from data.

        Parameters
        ----------
        X : ignored
        y : ignored

        Returns
        -------
        self
        """
        self._reset_fitted()  # a failed refit leaves the estimator unfitted, not half old
        self._check_params()
        tasks, _, _, _ = self._validated_models()
        self.tasks_ = tasks
        self.extra_params_ = 0
        self._freeze_merge_params()
        return self

    def _check_params(self):
        pass

    def transform(self, X=None):
        """The merged model: one encoder (user's class) + copies of the heads.

        Parameters
        ----------
        X : ignored

        Returns
        -------
        MergedModel
        """
        check_is_fitted(self, "tasks_")
        encoder = clone_with_state(self.pretrained_encoder, self._merged_state())
        return MergedModel(encoder, _copy_heads(V.check_heads_dict(self.heads), self.tasks_)).eval()


class PretrainedHeads(_StateMerger):
    """The pretrained encoder with every task's head: the lower reference.

    Parameters
    ----------
    pretrained_encoder, finetuned_encoders, heads
        As for :class:`momaestimator.MOMAMerger`, except that the fine-tuned encoders must be
        modules (no state dicts, checkpoint paths or loaders).

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import PretrainedHeads
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> 0.0 <= PretrainedHeads(pre, experts, heads).fit().score(data) <= 1.0
    True
    """

    def __init__(self, pretrained_encoder=None, finetuned_encoders=None, heads=None):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads

    def _merged_state(self):
        return {k: v.detach() for k, v in self.pretrained_encoder.state_dict().items()}


class WeightAveraging(_StateMerger):
    """Average of the fine-tuned encoders' weights (model soup).

    Parameters
    ----------
    pretrained_encoder, finetuned_encoders, heads
        As for :class:`momaestimator.MOMAMerger`, except that the fine-tuned encoders must be
        modules (no state dicts, checkpoint paths or loaders).

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import WeightAveraging
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> WeightAveraging(pre, experts, heads).fit().extra_params_
    0
    """

    def __init__(self, pretrained_encoder=None, finetuned_encoders=None, heads=None):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads

    def _merged_state(self):
        return weight_averaging(self.finetuned_encoders, pretrained=self.pretrained_encoder)


class TaskArithmetic(_StateMerger):
    """Task Arithmetic: ``θ_0 + λ Σ_t τ_t``.

    Parameters
    ----------
    pretrained_encoder, finetuned_encoders, heads
        As for :class:`momaestimator.MOMAMerger`, except that the fine-tuned encoders must be
        modules (no state dicts, checkpoint paths or loaders).
    scaling : float, default=0.3
        λ.

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import TaskArithmetic
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> model = TaskArithmetic(pre, experts, heads, scaling=0.5).fit().transform()
    >>> sorted(model.heads)
    ['task0', 'task1']
    """

    def __init__(self, pretrained_encoder=None, finetuned_encoders=None, heads=None, *, scaling=0.3):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads
        self.scaling = scaling

    def _check_params(self):
        V.check_number(self.scaling, "scaling", low=0.0, low_open=True)

    def _merged_state(self):
        return task_arithmetic(self.pretrained_encoder, self.finetuned_encoders, scaling=self._merge_param("scaling"))


class TiesMerging(_StateMerger):
    """TIES-Merging (trim, elect sign, disjoint merge) with scale λ.

    Parameters
    ----------
    pretrained_encoder, finetuned_encoders, heads
        As for :class:`momaestimator.MOMAMerger`, except that the fine-tuned encoders must be
        modules (no state dicts, checkpoint paths or loaders).
    scaling : float, default=0.3
    top_k : float, default=0.2
    merge : {"sum", "mean", "max"}, default="sum"

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import TiesMerging
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> TiesMerging(pre, experts, heads).fit().tasks_
    ['task0', 'task1']
    """

    def __init__(
        self, pretrained_encoder=None, finetuned_encoders=None, heads=None, *, scaling=0.3, top_k=0.2, merge="sum"
    ):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads
        self.scaling = scaling
        self.top_k = top_k
        self.merge = merge

    def _check_params(self):
        V.check_number(self.scaling, "scaling", low=0.0, low_open=True)
        V.check_number(self.top_k, "top_k", low=0.0, high=1.0, low_open=True)
        V.check_choice(self.merge, "merge", ("sum", "mean", "max"))

    def _merged_state(self):
        return ties_merging(
            self.pretrained_encoder,
            self.finetuned_encoders,
            scaling=self._merge_param("scaling"),
            top_k=self._merge_param("top_k"),
            merge=self._merge_param("merge"),
        )


class MultiEncoderModel(nn.Module):
    """One encoder per task (the individual experts): ``forward(x, task)``.

    Returned by :meth:`IndividualExperts.transform`.

    Parameters
    ----------
    encoders : dict of str to torch.nn.Module
        One encoder per task.
    heads : dict of str to torch.nn.Module
        One head per task, same keys.

    Examples
    --------
    >>> import torch
    >>> from momaestimator.baselines import MultiEncoderModel
    >>> model = MultiEncoderModel({"a": torch.nn.Identity()}, {"a": torch.nn.Linear(2, 3)})
    >>> model(torch.zeros(4, 2), "a").shape
    torch.Size([4, 3])
    """

    def __init__(self, encoders, heads):
        super().__init__()
        self.encoders = nn.ModuleDict(dict(encoders))
        self.heads = nn.ModuleDict(dict(heads))

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        """Logits of ``task``'s head on ``x``.

        Parameters
        ----------
        x : torch.Tensor
            A batch of encoder inputs.
        task : str
            Which task's encoder/adapter and head to use.

        Returns
        -------
        torch.Tensor
        """
        task = task if isinstance(task, str) else str(task)
        return self.heads[task](self.encoders[task](x))


class IndividualExperts(_StateMerger):
    """Each task served by its own fine-tuned encoder: the upper reference (T encoders).

    Parameters
    ----------
    pretrained_encoder, finetuned_encoders, heads
        As for :class:`momaestimator.MOMAMerger`, except that the fine-tuned encoders must be
        modules (no state dicts, checkpoint paths or loaders).

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.baselines import IndividualExperts
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=3)
    >>> IndividualExperts(pre, experts, heads).fit().extra_params_ == 2 * sum(p.numel() for p in pre.parameters())
    True
    """

    def __init__(self, pretrained_encoder=None, finetuned_encoders=None, heads=None):
        self.pretrained_encoder = pretrained_encoder
        self.finetuned_encoders = finetuned_encoders
        self.heads = heads

    def fit(self, X=None, y=None):
        """Validate the models.

        Parameters
        ----------
        X : ignored
        y : ignored

        Returns
        -------
        self
        """
        self._reset_fitted()  # a failed refit leaves the estimator unfitted, not half old
        super().fit(X, y)
        self.extra_params_ = (len(self.tasks_) - 1) * count_parameters(self.pretrained_encoder)
        return self

    def transform(self, X=None):
        """A model holding a copy of every expert.

        Parameters
        ----------
        X : ignored

        Returns
        -------
        MultiEncoderModel
        """
        check_is_fitted(self, "tasks_")
        fts = V.check_task_dict(self.finetuned_encoders, "finetuned_encoders")
        encoders = {
            t: clone_with_state(fts[t], {k: v.detach() for k, v in fts[t].state_dict().items()}) for t in self.tasks_
        }
        return MultiEncoderModel(encoders, _copy_heads(V.check_heads_dict(self.heads), self.tasks_)).eval()
