"""
Merging real CLIP ViT-B/32 checkpoints
======================================

A walkthrough (rendered, not executed: it needs the task_vectors checkpoints, about 5 GB, and the
eight datasets) of MOMA on the field's standard benchmark: eight CLIP ViT-B/32 image towers
fine-tuned on SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST and DTD, each with a frozen
zero-shot head.

Expected folder layout (the task_vectors release of Ilharco et al.)::

    checkpoints/ViT-B-32/zeroshot.pt
    checkpoints/ViT-B-32/<Task>/finetuned.pt      one per task
    checkpoints/ViT-B-32/head_<Task>.pt           one per task

The same in one shell command: ``momaestimator merge --release task_vectors --root checkpoints
--model ViT-B-32 --data unlabeled/ --out merged-vit-b-32 --device cuda``.
"""

# %%
# Load the release
# ----------------
# The encoders of this release are whole pickled objects of an old open_clip. They are read with a
# restricted unpickler (nothing outside a short allow-list is ever imported or called) and
# returned as today's open_clip ``VisionTransformer`` towers; heads become normalising
# :class:`~momaestimator.LinearHead` modules with the logit scale folded in.

import torch

from momaestimator import MOMAMerger
from momaestimator.checkpoints import TASK_VECTORS_TASKS, load_task_vectors_release, save_merged_model

pretrained, finetuned, heads = load_task_vectors_release("checkpoints", model="ViT-B-32")
print(TASK_VECTORS_TASKS)  # ('SUN397', 'Cars', 'RESISC45', 'EuroSAT', 'SVHN', 'GTSRB', 'MNIST', 'DTD')

# %%
# A few unlabeled images per task
# -------------------------------
# MOMA needs only unlabeled inputs: here 5 images per class from each task's train split,
# preprocessed with the CLIP transform (224 × 224, CLIP normalisation). Any of a DataLoader, a
# Dataset, a tensor or an array per task works; ``load_my_images`` stands for your data code.


def load_my_images(task: str) -> torch.Tensor:
    """Return a (n, 3, 224, 224) float tensor of preprocessed train images of ``task``."""
    raise NotImplementedError("replace with your data loading")


unlabeled = {task: load_my_images(task) for task in finetuned}

# %%
# Fit and absorb
# --------------
# On a GPU, 200 steps take minutes. The multi-task vector uses Task Arithmetic with the field's
# λ = 0.3; the mask removes 10 % of it.

merger = MOMAMerger(
    pretrained,
    finetuned,
    heads,
    sparsity=0.1,
    scaling=0.3,
    n_steps=200,
    batch_size=16,
    device="cuda",
    precision="bf16",
    random_state=0,
    verbose=1,
)
merger.fit(unlabeled)
model = merger.transform()  # one ViT-B/32 image tower + the eight heads, nothing else
print(sum(p.numel() for p in model.parameters()))

# %%
# Evaluate and save
# -----------------
# ``score_per_task`` needs labelled test data per task, e.g. ``{task: (images, labels)}`` or
# labelled DataLoaders. The merged model is saved as ``model.safetensors`` + ``model.json``
# and loads back without any of the original checkpoints.

test_loaders = {}  # {task: DataLoader yielding (images, labels)}: your data code
if test_loaders:
    print(merger.score_per_task(test_loaders))
save_merged_model(model, "merged-vit-b-32", architecture="ViT-B-32")
merger.save("merged-vit-b-32/moma-state.joblib")  # mask + rotations, to re-absorb or inspect later
