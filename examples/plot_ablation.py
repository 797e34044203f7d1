"""
Ablation: mask only, rotations only, both
=========================================

MOMA learns two things: a global mask over the multi-task vector (against interference between
tasks) and one rotation per task (against the misalignment between the merged encoder and the
frozen heads). Both are switches of :class:`~momaestimator.MOMAMerger`:
``learn_mask=False`` fits the rotations only, ``learn_rotations=False`` the mask only. With
``n_steps=0`` nothing is learned and the merger returns the base merge (Task Arithmetic) with the
magnitude-pruned mask of its ``sparsity``.

Each variant is fitted on unlabeled fit inputs and scored on separate labelled test inputs drawn
from the same toy tasks.
"""

import matplotlib.pyplot as plt
import numpy as np

from momaestimator import MOMAMerger, TaskSamples, toy

pretrained, experts, heads, data = toy.make_problem(
    n_tasks=4, n_classes=5, n_samples=60, noise=1.5, finetune_steps=30, random_state=0
)
X = TaskSamples.from_arrays({t: x for t, (x, _) in data.items()}, {t: y for t, (_, y) in data.items()})
rng = np.random.default_rng(0)
is_test = np.zeros(len(X), bool)
for idx in X.positions_by_task().values():  # a third of each task's samples for testing
    is_test[rng.choice(idx, len(idx) // 3, replace=False)] = True
X_fit, X_test = X[~is_test], X[is_test]

common = dict(sparsity=0.2, n_steps=80, rotation_lr=0.01, random_state=0)
variants = {
    "task arithmetic": MOMAMerger(pretrained, experts, heads, sparsity=0.0, n_steps=0),
    "mask only": MOMAMerger(pretrained, experts, heads, learn_rotations=False, **common),
    "rotations only": MOMAMerger(pretrained, experts, heads, learn_mask=False, **{**common, "sparsity": 0.0}),
    "mask + rotations (MOMA)": MOMAMerger(pretrained, experts, heads, **common),
}
scores = {}
for name, merger in variants.items():
    merger.fit(X_fit)
    scores[name] = merger.score_per_task(X_test)
    per_task = "  ".join(f"{t} {a:.2f}" for t, a in scores[name].items())
    print(f"{name:25s} mean {np.mean(list(scores[name].values())):.3f} | {per_task}")

# %%
# Per-task and mean accuracy of each variant. All four return the same architecture and
# parameter count: one encoder plus the original heads.

tasks = list(scores["task arithmetic"])
fig, ax = plt.subplots(figsize=(8, 3.8))
width = 0.8 / len(variants)
pos = np.arange(len(tasks) + 1)
for i, (name, s) in enumerate(scores.items()):
    values = [s[t] for t in tasks] + [np.mean(list(s.values()))]
    ax.bar(pos + (i - (len(variants) - 1) / 2) * width, values, width, label=name)
ax.set_xticks(pos, [*tasks, "mean"])
ax.set_ylabel("test accuracy")
ax.set_ylim(0, 1)
ax.set_title("Ablation on the toy problem")
ax.legend(fontsize=8, ncol=2, loc="lower right")
fig.tight_layout()
plt.show()

# %%
# Reading the result: each task has 20 test samples here, so a difference of 0.05 is one image,
# and the toy towers are tiny random ViTs, not CLIP. The point of this example is the protocol
# (same fit data, same budget, one switch per variant); run it on your models, or see the
# benchmark (:doc:`/user_guide/benchmark`) for real images over several seeds.
