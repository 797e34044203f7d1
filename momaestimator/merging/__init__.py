"""Pure-torch merging core (never imports scikit-learn).

Base merges on state dicts (:func:`task_arithmetic`, :func:`ties_merging`,
:func:`weight_averaging`, :func:`task_vector`, :func:`multitask_vector`), MOMA's pieces
(:class:`GlobalMask`, :class:`Rotations`, objectives) and the fitting loop (:func:`fit_moma`).
"""

from .checkpointing import BlockMerge, checkpoint_blocks, find_blocks, recompute_blocks
from .fit import (
    FitConfig,
    FitResult,
    ScoreAdam,
    fit_moma,
    moma_logits,
    pass_plan,
    recomputed_blocks,
    task_groups,
    teacher_targets,
)
from .functional import (
    absorb_heads,
    clone_with_state,
    first_linear_weight,
    plain_head,
    rotation_mismatch,
    structure_copy,
)
from .mask import GlobalMask, masked_merge, merge_entry, score_gradient
from .objectives import entropy, feature_alignment, kl_to_teacher
from .rotation import Rotations, expm, rotation_angles
from .task_arithmetic import multitask_vector, task_arithmetic, ties_merging, weight_averaging
from .task_vectors import task_vector

__all__ = [
    "BlockMerge",
    "FitConfig",
    "FitResult",
    "GlobalMask",
    "Rotations",
    "ScoreAdam",
    "absorb_heads",
    "checkpoint_blocks",
    "clone_with_state",
    "entropy",
    "expm",
    "feature_alignment",
    "find_blocks",
    "first_linear_weight",
    "plain_head",
    "fit_moma",
    "kl_to_teacher",
    "masked_merge",
    "merge_entry",
    "moma_logits",
    "multitask_vector",
    "pass_plan",
    "recompute_blocks",
    "recomputed_blocks",
    "rotation_angles",
    "score_gradient",
    "rotation_mismatch",
    "structure_copy",
    "task_arithmetic",
    "task_groups",
    "task_vector",
    "teacher_targets",
    "ties_merging",
    "weight_averaging",
]
