"""
Is the misalignment a rotation?
===============================

MOMA rests on one claim: the features of a merged encoder differ from each fine-tuned expert's
*predominantly by an orthogonal transformation*, so a rotation in front of each frozen head
recovers most of the lost accuracy, and it can be absorbed for free.
:func:`~momaestimator.analysis.misalignment_report` tests the claim on your models, before fitting
anything. Per task, on the base merge (Task Arithmetic), it fits:

- the closed-form orthogonal Procrustes map from merged to expert features;
- an unconstrained linear map with the same least-squares objective;

and reports their residuals relative to doing nothing (the identity), how much of the linear map's
improvement the rotation alone achieves (``orthogonal_share``), how far the linear map is from
orthogonal, and accuracies with the frozen head after each map. Maps are fitted on ``X`` and
measured on held-out ``X_eval``.

This example runs it on the embedded benchmark's zoo (real images that ship in packages), in its
reduced ``quick`` configuration so that the docs build it in seconds: a small open_clip ViT tower,
frozen normalising heads and one anchored expert per task (see :mod:`momaestimator.bench.zoo`). The
maps are fitted on 10 unlabeled train images per class and measured on each task's test split. Run
``moma-bench`` for the full zoo: its report contains the same analysis.
"""

import tempfile

import matplotlib.pyplot as plt

from momaestimator.analysis import misalignment_report, plot_misalignment
from momaestimator.bench.run import few_shot_indices
from momaestimator.bench.zoo import build_zoo, quick_config

zoo = build_zoo(
    ["mnist", "digits", "fashion_a", "textures"], config=quick_config(), cache_dir=tempfile.mkdtemp(), verbose=False
)
pretrained, experts, heads = zoo.pretrained, zoo.experts, zoo.heads
fit = {}
for t, split in zoo.data.items():
    idx = few_shot_indices(split.y_train, 10, seed=0)
    fit[t] = (split.X_train[idx], split.y_train[idx])
held_out = {t: (split.X_test, split.y_test) for t, split in zoo.data.items()}
lam = 0.7  # the full zoo's validation-chosen Task Arithmetic scale
rows = misalignment_report(pretrained, experts, heads, fit, scaling=lam, X_eval=held_out)

cols = [
    "orthogonal_share",
    "linear_polar_distance",
    "accuracy_merged",
    "accuracy_procrustes",
    "accuracy_linear",
    "accuracy_expert",
    "knn_merged",
    "knn_expert",
    "verdict",
]
print(f"{'task':6s} " + " ".join(f"{c[:14]:>14s}" for c in cols))
for r in rows:
    print(f"{r['task']:6s} " + " ".join(f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]:>14s}" for c in cols))

# %%
# Residuals to the expert features (relative to the identity map): if the rotation's residual is
# close to the linear map's, the misalignment is mostly a rotation.

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
plot_misalignment(rows, ax=ax1)
ax1.set_title("misalignment residual per task (held out)")
tasks = [r["task"] for r in rows]
for key, marker in (("accuracy_merged", "o"), ("accuracy_procrustes", "s"), ("accuracy_expert", "^")):
    ax2.plot(tasks, [r[key] for r in rows], marker, ms=8, label=key.replace("accuracy_", ""))
ax2.set_ylabel("accuracy with the frozen head")
ax2.set_ylim(0, 1.05)
ax2.legend(fontsize=8)
ax2.set_title("accuracy after each map")
fig.tight_layout()
plt.show()

# %%
# Reading the result: the ``verdict`` column says "orthogonal" only when the rotation achieves at
# least ``threshold`` (0.8) of the linear map's residual reduction *and* the linear map is itself
# close to orthogonal. This zoo is not CLIP, and the verdict here is printed, not assumed: judge
# MOMA's premise on your own encoders with the same call.
