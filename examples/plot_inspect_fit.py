"""
What did the mask and the rotations learn?
==========================================

A fitted :class:`~momaestimator.MOMAMerger` exposes what it learned: ``mask_`` (one boolean tensor
per entry of the encoder's state dict, ``True`` = the entry of ``τ_MT`` is kept), ``rotations_``
(one orthogonal ``Q_t`` per task) and ``history_`` (the fit and held-out objective per step).
:mod:`momaestimator.analysis` summarises them per layer and per task.
"""

import matplotlib.pyplot as plt
import numpy as np
import torch

from momaestimator import MOMAMerger, toy
from momaestimator.analysis import mask_statistics, plot_history, plot_mask_statistics, rotation_statistics

pretrained, experts, heads, data = toy.make_problem(
    n_tasks=4, n_classes=5, n_samples=60, noise=1.5, finetune_steps=30, random_state=0
)
unlabeled = {t: x for t, (x, _) in data.items()}
merger = MOMAMerger(
    pretrained, experts, heads, sparsity=0.3, n_steps=80, rotation_lr=0.01, validation_fraction=0.2, random_state=0
)
merger.fit(unlabeled)
print(f"kept the state of step {merger.best_step_} of {merger.n_iter_} (lowest held-out KL)")

# %%
# Mask statistics per tensor. The sparsity is global: some tensors keep nearly everything, others
# lose more than 30 % of their entries.

stats = mask_statistics(merger)
kept = sum(s["kept"] for s in stats) / sum(s["numel"] for s in stats)
print(f"overall kept fraction: {kept:.3f} (sparsity 0.3)")
for s in sorted(stats, key=lambda s: s["kept_fraction"])[:5]:
    print(f"  {s['tensor']:40s} {s['numel']:6d} entries, kept {s['kept_fraction']:.2f}")

# %%
# Rotation statistics per task: distance of ``Q_t`` from the identity and its principal angles.
# Every ``Q_t`` is exactly orthogonal by construction.

for r in rotation_statistics(merger):
    q = merger.rotations_[r["task"]]
    err = (q.T @ q - torch.eye(q.shape[0])).abs().max().item()
    print(
        f"  {r['task']}: ‖Q − I‖_F = {r['frobenius_from_identity']:.3f}, max angle {r['max_angle_deg']:.1f}°,"
        f" mean angle {r['mean_angle_deg']:.1f}°, max |QᵀQ − I| = {err:.1e}"
    )

# %%
# The figure: kept fraction per tensor, the optimisation history with the held-out KL used for
# early stopping, and the principal angles of each rotation.

fig = plt.figure(figsize=(10, 7))
ax_mask = fig.add_subplot(1, 2, 1)
plot_mask_statistics(merger, ax=ax_mask)
ax_mask.set_title("mask: fraction of τ_MT kept per tensor")
ax_hist = fig.add_subplot(2, 2, 2)
plot_history(merger, ax=ax_hist)
ax_hist.axvline(merger.best_step_, color="grey", ls=":")
ax_hist.set_title("objective (KL to the experts)")
ax_rot = fig.add_subplot(2, 2, 4)
from momaestimator.merging import rotation_angles  # noqa: E402

for t, q in merger.rotations_.items():
    ax_rot.plot(np.degrees(rotation_angles(q).numpy()), "o-", label=t)
ax_rot.set_xlabel("principal angle index")
ax_rot.set_ylabel("angle (degrees)")
ax_rot.set_title("rotations Q_t")
ax_rot.legend(fontsize=8)
fig.tight_layout()
plt.show()
