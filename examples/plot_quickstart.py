"""
Quickstart: fit, transform, score
=================================

Merge three fine-tuned tiny open_clip image towers with MOMA, absorb the learned mask and
rotations, and compare per-task accuracy with the plain Task Arithmetic merge it starts from.
The toy models are synthetic and tiny (seconds on a CPU); see the benchmark for real images.
Here the merger is fitted on the same inputs it is scored on, without their labels (the
transductive protocol of AdaMerging); the benchmark also runs the few-shot train-split protocol.
"""

import matplotlib.pyplot as plt
import numpy as np

from momaestimator import MOMAMerger, toy

pretrained, experts, heads, data = toy.make_problem(
    n_tasks=4, n_classes=5, n_samples=60, noise=1.5, finetune_steps=30, random_state=0
)
unlabeled = {task: x for task, (x, _) in data.items()}

base = MOMAMerger(pretrained, experts, heads, sparsity=0.0, n_steps=0).fit(unlabeled)
moma = MOMAMerger(
    pretrained, experts, heads, sparsity=0.2, n_steps=80, rotation_lr=0.01, validation_fraction=0.2, random_state=0
)
moma.fit(unlabeled)
model = moma.transform()  # one encoder + the heads: no extra parameters

n_params = sum(p.numel() for p in model.parameters())
print(f"merged model parameters: {n_params} (= encoder + heads: {toy.count_parameters(pretrained, heads)})")
acc_base, acc_moma = base.score_per_task(data), moma.score_per_task(data)
print("task arithmetic:", acc_base)
print("MOMA:           ", acc_moma)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
tasks = list(acc_moma)
pos = np.arange(len(tasks))
ax1.bar(pos - 0.2, [acc_base[t] for t in tasks], 0.4, label="task arithmetic")
ax1.bar(pos + 0.2, [acc_moma[t] for t in tasks], 0.4, label="MOMA")
ax1.set_xticks(pos, tasks)
ax1.set_ylabel("accuracy")
ax1.legend()
ax2.plot([h["step"] for h in moma.history_], [h["loss"] for h in moma.history_], label="fit KL")
val = [(h["step"], h["valid_loss"]) for h in moma.history_ if "valid_loss" in h]
ax2.plot(*zip(*val), "o-", label="held-out KL")
ax2.set_xlabel("step")
ax2.legend()
fig.tight_layout()
plt.show()
