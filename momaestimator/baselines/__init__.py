"""The methods MOMA is compared with, behind the same estimator API as :class:`momaestimator.MOMAMerger`.

Every class takes ``(pretrained_encoder, finetuned_encoders, heads, **params)``, fits on unlabeled
per-task inputs (or nothing), returns a model with ``forward(x, task)`` from ``transform()``, scores
per task, and reports ``extra_params_`` — the inference parameters it adds beyond one encoder plus
the original heads.
"""

from .adaptive import AdaMerging, HeadFineTuning, ProcrustesAlignment, RepresentationSurgery, SurgeryModel
from .base import MergerBase, count_parameters
from .static import IndividualExperts, MultiEncoderModel, PretrainedHeads, TaskArithmetic, TiesMerging, WeightAveraging

__all__ = [
    "AdaMerging",
    "HeadFineTuning",
    "IndividualExperts",
    "MergerBase",
    "MultiEncoderModel",
    "PretrainedHeads",
    "ProcrustesAlignment",
    "RepresentationSurgery",
    "SurgeryModel",
    "TaskArithmetic",
    "TiesMerging",
    "WeightAveraging",
    "count_parameters",
]
