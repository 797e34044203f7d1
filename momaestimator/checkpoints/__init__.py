"""Real checkpoints in and out: the published releases, open_clip towers, safe loading, saving.

Loaders return today's open_clip image towers and :class:`~momaestimator.models.LinearHead`
heads, ready for ``MOMAMerger(pretrained, finetuned, heads)``. State dicts are read with
``weights_only=True``; the whole-object pickles of the task_vectors release go through a
restricted unpickler that refuses any global it does not know.
"""

from momaestimator.checkpoints.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError
from momaestimator.checkpoints.files import (
    atomic_write,
    load_legacy_pickle,
    load_state_dict_file,
    read_checkpoint,
)
from momaestimator.checkpoints.merged import load_merged_model, save_merged_model
from momaestimator.checkpoints.openclip import (
    build_open_clip_encoder,
    infer_open_clip_config,
    load_open_clip_encoder,
    matching_state,
    open_clip_model_config,
)
from momaestimator.checkpoints.releases import (
    TALL_MASKS_TASKS,
    TASK_VECTORS_TASKS,
    canonical_task_name,
    head_from_checkpoint,
    load_tall_masks_release,
    load_task_vectors_release,
    release_task_names,
)
from momaestimator.checkpoints.safe_pickle import LegacyObject, legacy_state_dict

__all__ = [
    "CheckpointError",
    "CorruptCheckpointError",
    "LegacyObject",
    "TALL_MASKS_TASKS",
    "TASK_VECTORS_TASKS",
    "UnsafeCheckpointError",
    "atomic_write",
    "build_open_clip_encoder",
    "canonical_task_name",
    "head_from_checkpoint",
    "infer_open_clip_config",
    "legacy_state_dict",
    "load_legacy_pickle",
    "load_merged_model",
    "load_open_clip_encoder",
    "load_state_dict_file",
    "load_tall_masks_release",
    "load_task_vectors_release",
    "matching_state",
    "open_clip_model_config",
    "read_checkpoint",
    "release_task_names",
    "save_merged_model",
]
