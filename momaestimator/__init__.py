"""momaestimator: MOMA model merging as a scikit-learn estimator.

Merge one fine-tuned encoder per task into one encoder that serves every task through its
original head, recovering accuracy with a learned global mask and per-task rotations that are
absorbed into the weights: zero added parameters, zero added inference cost.
"""

from . import merging, toy
from .data import TaskSamples
from .merger import MOMAMerger
from .metrics import per_task_accuracy_scorer
from .model_selection import TaskKFold
from .models import LinearHead, MergedModel

__version__ = "0.1.0"

__all__ = [
    "LinearHead",
    "MOMAMerger",
    "MergedModel",
    "TaskKFold",
    "TaskSamples",
    "merging",
    "per_task_accuracy_scorer",
    "toy",
]
