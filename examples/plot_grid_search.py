"""
Choosing the mask sparsity with GridSearchCV
============================================

:class:`~momaestimator.MOMAMerger` is a scikit-learn estimator, so a grid search over the mask's
``sparsity`` is a plain :class:`~sklearn.model_selection.GridSearchCV`. Three helpers make per-task
data work with it:

- :class:`~momaestimator.TaskSamples` gives the per-task inputs an indexable, splittable form;
- :class:`~momaestimator.TaskKFold` puts every task in every fold;
- :func:`~momaestimator.per_task_accuracy_scorer` scores the mean *and* each task, so
  ``cv_results_`` has one column per task.

Fitting only uses the inputs of the training folds, never their labels; the labels of the held-out
fold are used by the scorer.
"""

import matplotlib.pyplot as plt
from sklearn.model_selection import GridSearchCV

from momaestimator import MOMAMerger, TaskKFold, TaskSamples, per_task_accuracy_scorer, toy

pretrained, experts, heads, data = toy.make_problem(
    n_tasks=4, n_classes=5, n_samples=60, noise=1.5, finetune_steps=30, random_state=0
)
X = TaskSamples.from_arrays({t: x for t, (x, _) in data.items()}, {t: y for t, (_, y) in data.items()})
print(X)

# %%
# The search: four sparsities, three task-stratified folds, the per-task scorer, refit on the
# best mean accuracy. ``clone`` shares the encoders between candidates, it never copies them.

search = GridSearchCV(
    MOMAMerger(pretrained, experts, heads, n_steps=60, rotation_lr=0.01, random_state=0),
    param_grid={"sparsity": [0.0, 0.1, 0.2, 0.4]},
    cv=TaskKFold(n_splits=3, shuffle=True, random_state=0),
    scoring=per_task_accuracy_scorer,
    refit="mean",
)
search.fit(X)
print("best:", search.best_params_, f"mean accuracy {search.best_score_:.3f}")

# %%
# Per-task results: one ``mean_test_<task>`` column per task, plus the mean.

res = search.cv_results_
sparsities = [p["sparsity"] for p in res["params"]]
fig, ax = plt.subplots(figsize=(7, 3.8))
for task in search.best_estimator_.tasks_:
    ax.plot(sparsities, res[f"mean_test_{task}"], "o-", alpha=0.7, label=task)
ax.errorbar(sparsities, res["mean_test_mean"], yerr=res["std_test_mean"], fmt="s-k", lw=2, capsize=3, label="mean")
ax.axvline(search.best_params_["sparsity"], color="grey", ls=":", label="selected")
ax.set_xlabel("mask sparsity (fraction of τ_MT removed)")
ax.set_ylabel("held-out accuracy (3-fold CV)")
ax.set_title("GridSearchCV over sparsity, per task")
ax.legend(ncol=3, fontsize=8)
fig.tight_layout()

# %%
# The refitted best estimator is fitted on all of ``X`` and absorbs into a plain model.

model = search.best_estimator_.transform()
n_params = sum(p.numel() for p in model.parameters())
print(f"{n_params} parameters = one encoder + the heads ({toy.count_parameters(pretrained, heads)})")
for params, mean, std in zip(res["params"], res["mean_test_mean"], res["std_test_mean"]):
    print(f"sparsity {params['sparsity']:.1f}: mean accuracy {mean:.3f} ± {std:.3f}")
plt.show()
