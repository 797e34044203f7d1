"""Short reprs for estimators whose parameters are whole models.

scikit-learn prints an estimator with its changed parameters; for a merger those are encoders of
hundreds of modules, so ``repr(merger)`` would open with a page of one ViT's layers. Here a module
is shown as ``ClassName(...)`` and a dict of them by its keys and classes; the estimator itself
and its parameters are not touched (the summary is built on a shallow copy).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

from torch import nn

MODULE_PARAMS = ("pretrained_encoder", "finetuned_encoders", "heads")


class _Shown:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _summary(value):
    if isinstance(value, nn.Module):
        return _Shown(f"{type(value).__name__}(...)")
    if isinstance(value, Mapping):
        return {k: _summary(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_summary(v) for v in value)
    return value


class ModuleSummaryReprMixin:
    """``repr`` and the notebook display of an estimator, with its models summarised.

    Examples
    --------
    >>> from momaestimator import MOMAMerger, toy
    >>> pre, experts, heads, _ = toy.make_problem(n_tasks=2)
    >>> MOMAMerger(pre, experts, heads, sparsity=0.2)  # doctest: +NORMALIZE_WHITESPACE
    MOMAMerger(finetuned_encoders={'task0': VisionTransformer(...), 'task1': VisionTransformer(...)},
               heads={'task0': LinearHead(...), 'task1': LinearHead(...)},
               pretrained_encoder=VisionTransformer(...), sparsity=0.2)
    """

    def _summarised(self):
        shown = copy.copy(self)  # shallow: the models are shared, never modified
        for name in MODULE_PARAMS:
            if name in shown.__dict__:
                shown.__dict__[name] = _summary(shown.__dict__[name])
        return shown

    def __repr__(self, N_CHAR_MAX=700):
        return super(ModuleSummaryReprMixin, self._summarised()).__repr__(N_CHAR_MAX)

    def _html_repr(self):
        from sklearn.utils import estimator_html_repr

        return estimator_html_repr(self._summarised())


def _register_with_sklearn_printer() -> None:
    """Let scikit-learn's pretty-printer lay out these estimators like any other (80 columns), with
    their models summarised — inside a ``GridSearchCV`` or a ``Pipeline`` too, where it formats
    the child's parameters itself. Its dispatch is keyed by ``__repr__``, which the mixin replaces.
    """
    try:
        from sklearn.utils._pprint import _EstimatorPrettyPrinter
    except ImportError:  # a scikit-learn without this private printer: the plain one-line repr
        return
    plain = _EstimatorPrettyPrinter._pprint_estimator

    def pprint_summarised(printer, obj, *args):
        return plain(printer, obj._summarised(), *args)

    _EstimatorPrettyPrinter._dispatch[ModuleSummaryReprMixin.__repr__] = pprint_summarised


_register_with_sklearn_printer()
