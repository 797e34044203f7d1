"""Check MOMA's core claim on your own models: is the misalignment mostly a rotation.

MOMA assumes the merged encoder's features differ from each expert's *predominantly by an
orthogonal transformation*. :func:`misalignment_report` measures it per task on the base merge:

- how often the merged model agrees with the expert (and its accuracy, given labels);
- whether the merged features still separate the classes (k-NN probe, merged vs expert features);
- the closed-form orthogonal Procrustes map merged → expert features: its residual relative to
  doing nothing (the identity) and the accuracy with the head after it;
- an unconstrained linear map fitted with the same least-squares objective: its residual, how far
  it is from orthogonal (singular value spread, ``‖P − I‖`` of its polar factor) and its accuracy.

The ``orthogonal_share`` column is the part of the linear map's residual reduction that the
rotation alone achieves; ``verdict`` says "orthogonal" when it is at least ``threshold`` *and* the
best linear map is itself close to orthogonal on the features' subspace (``linear_polar_distance``
at most ``max_distortion``).
Maps are fitted on ``X`` and measured on ``X_eval`` (held-out) when given.

For a fitted :class:`~momaestimator.MOMAMerger`, :func:`mask_statistics` and
:func:`rotation_statistics` summarise what was learned; ``plot_*`` helpers draw them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import _validation as V
from .data import index_input_hint, iter_task_batches, model_inputs, split_inputs_and_labels
from .merging.fit import merged_state
from .merging.functional import encode, first_linear_weight, structure_copy
from .merging.rotation import orthogonal_procrustes, rotation_angles
from .merging.task_arithmetic import multitask_vector
from .merging.task_vectors import as_state_dict
from .metrics import check_class_labels

__all__ = [
    "mask_statistics",
    "misalignment_report",
    "plot_history",
    "plot_mask_statistics",
    "plot_misalignment",
    "rotation_statistics",
]


def _inputs(X, task_order):
    sources, labels = split_inputs_and_labels(X, None)
    V.check_same_tasks(heads=dict.fromkeys(task_order), X=sources)
    out = {}
    for t in task_order:
        xs, ys = [], []
        for x, y in iter_task_batches(sources[t], labels[t], task=t):
            x = model_inputs(x)
            if not torch.isfinite(x).all():
                raise ValueError(f"X[{t!r}] contains NaN or infinite values")
            xs.append(x)
            ys.append(None if y is None else torch.as_tensor(check_class_labels(y, t)))
        if not xs:
            raise ValueError(f"X[{t!r}] is empty")
        out[t] = (torch.cat(xs), None if any(y is None for y in ys) else torch.cat(ys))
    return out


def _head_parts(head):
    """``(W, b, normalize)`` of a head's first linear map, for applying it to mapped features."""
    name = first_linear_weight(head)
    state = head.state_dict()
    w = state[name].detach().double()
    b = state.get(name[: -len("weight")] + "bias")
    return w, (None if b is None else b.detach().double()), bool(getattr(head, "normalize", False))


def _logits(head, z):
    """``head(z)`` in the head's dtype and on its device; float64 logits on the CPU."""
    ref = next((v for v in head.state_dict().values() if v.is_floating_point()), None)
    dtype, device = (torch.float32, z.device) if ref is None else (ref.dtype, ref.device)
    return head(z.to(device=device, dtype=dtype)).double().cpu()


def _knn_accuracy(z, y, k):
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    n_classes_min = int(torch.unique(y, return_counts=True)[1].min()) if len(y) else 0  # classes present
    folds = min(5, n_classes_min)
    if folds < 2:
        return float("nan")
    z = F.normalize(z, dim=-1).numpy()
    return float(
        cross_val_score(KNeighborsClassifier(n_neighbors=min(k, len(y) // folds)), z, y.numpy(), cv=folds).mean()
    )


def misalignment_report(
    pretrained_encoder,
    finetuned_encoders,
    heads,
    X,
    *,
    base="task_arithmetic",
    scaling=0.3,
    top_k=0.2,
    X_eval=None,
    n_neighbors=5,
    ridge=1e-4,
    threshold=0.8,
    max_distortion=0.25,
):
    """Per-task measurements of how the base merge's features are misaligned with each expert's.

    Parameters
    ----------
    pretrained_encoder : torch.nn.Module
    finetuned_encoders : dict of str to torch.nn.Module
    heads : dict of str to torch.nn.Module
    X : dict or TaskSamples
        Inputs per task on which the maps are fitted (labels optional).
    base : {"task_arithmetic", "ties"}, default="task_arithmetic"
    scaling : float, default=0.3
        λ of the base merge.
    top_k : float, default=0.2
        TIES only.
    X_eval : dict or TaskSamples, optional
        Held-out inputs (labelled for accuracies) on which everything is measured; ``X`` when omitted.
    n_neighbors : int, default=5
        k of the k-NN probe (cross-validated on ``X_eval``; needs labels).
    ridge : float, default=1e-4
        Ridge penalty of the unconstrained linear map (relative to the features' scale).
    threshold : float, default=0.8
        Minimum ``orthogonal_share`` for the verdict "orthogonal".
    max_distortion : float, default=0.25
        Maximum ``linear_polar_distance`` (spread of the linear map's singular values on the
        features' subspace, ``‖S/mean(S) − 1‖/√k``) for the verdict "orthogonal".

    Returns
    -------
    list of dict
        One row per task (see the module docstring); ready for ``pandas.DataFrame(rows)``.

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.analysis import misalignment_report
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> rows = misalignment_report(pre, experts, heads, data)
    >>> sorted(rows[0])[:3]
    ['accuracy_expert', 'accuracy_linear', 'accuracy_merged']
    """
    fts = V.check_task_dict(finetuned_encoders, "finetuned_encoders")
    heads = V.check_heads_dict(heads)
    tasks = V.check_same_tasks(finetuned_encoders=fts, heads=heads)
    V.check_choice(base, "base", V.BASES)
    V.check_number(scaling, "scaling", low=0.0, low_open=True)
    V.check_number(top_k, "top_k", low=0.0, high=1.0, low_open=True)
    V.check_number(n_neighbors, "n_neighbors", low=1, integer=True)
    V.check_number(ridge, "ridge", low=0.0)
    V.check_number(threshold, "threshold", low=0.0, high=1.0)
    V.check_number(max_distortion, "max_distortion", low=0.0)
    fit_data = _inputs(X, tasks)
    eval_data = _inputs(X_eval, tasks) if X_eval is not None else fit_data
    pre = as_state_dict(pretrained_encoder, name="pretrained_encoder")
    V.check_state(pre, "pretrained_encoder")
    for t in tasks:  # the same architecture, finite weights: before any forward pass
        V.check_encoder_states(pre, as_state_dict(fts[t]), t)
    device = next(iter(pre.values())).device  # where the user's models are (a GPU too)
    skeleton = structure_copy(pretrained_encoder, device=device)
    dtype = V.encoder_dtype(pretrained_encoder, pre) or torch.float32
    x0 = model_inputs(fit_data[tasks[0]][0][:1], dtype=dtype, device=device)
    V.check_heads(heads, V.feature_dim(skeleton, pre, x0), dtype, rotations=False)
    tau = multitask_vector(pre, fts, base=base, top_k=top_k)
    theta = merged_state(pre, tau, None, scaling)
    rows = []
    with torch.no_grad():
        for t in tasks:
            ft_state = {k: v.to(device) for k, v in as_state_dict(fts[t]).items()}
            feats = {}
            for split, (x, _) in (("fit", fit_data[t]), ("eval", eval_data[t])):
                x = model_inputs(x, dtype=dtype, device=device)  # the models' dtype (float64, half precision)
                # the analysis itself runs in float64 on the CPU (the features are small)
                with V.inputs_blamed(
                    f"X[{t!r}]: the encoder cannot take inputs of shape {tuple(x.shape[1:])} per sample"
                    + index_input_hint(x)
                ):
                    feats[split] = tuple(encode(skeleton, s, x).cpu().double() for s in (theta, ft_state))
            rows.append(_task_row(t, heads[t], feats, eval_data[t][1], n_neighbors, ridge, threshold, max_distortion))
    return rows


def _task_row(task, head, feats, y, n_neighbors, ridge, threshold, max_distortion):
    (a_fit, b_fit), (a, b) = feats["fit"], feats["eval"]
    na_fit, nb_fit = F.normalize(a_fit, dim=-1), F.normalize(b_fit, dim=-1)
    na, nb = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    d = a.shape[1]
    # any orthogonal map (reflections too), the identity outside the span of the fit samples
    q = orthogonal_procrustes(na_fit, nb_fit, proper=False).to(na_fit.dtype)
    gram = na_fit.T @ na_fit
    lin = torch.linalg.solve(gram + ridge * torch.trace(gram) / d * torch.eye(d, dtype=gram.dtype), na_fit.T @ nb_fit).T

    def resid(m):
        return float((na @ m.T - nb).norm() / nb.norm())

    r_id, r_q, r_lin = resid(torch.eye(d, dtype=q.dtype)), resid(q), resid(lin)
    # share of the linear map's (held-out) residual reduction that the rotation achieves; undefined
    # when no linear map beats doing nothing on held-out data (e.g. maps overfitted to few samples)
    share = min(1.0, (r_id - r_q) / (r_id - r_lin)) if r_id - r_lin > 1e-12 else float("nan")
    # How the linear map acts on the subspace the features occupy (eigenvalues above 1e-4 of the
    # largest): for an orthogonal map all singular values there are equal; directions without data
    # are left to the ridge penalty and say nothing.
    evals, evecs = torch.linalg.eigh(gram)
    k = int((evals >= 1e-4 * evals.max()).sum())
    sv = torch.linalg.svdvals(lin @ evecs.flip(1)[:, :k])
    polar = float((sv / sv.mean() - 1).norm() / k**0.5)
    expert_logits = _logits(head, b)
    if y is not None:
        check_class_labels(y.numpy(), task, n_classes=expert_logits.shape[-1])
    expert_pred = expert_logits.argmax(-1)
    preds = {
        "merged": _logits(head, a).argmax(-1),
        "procrustes": _logits(head, a @ q.T).argmax(-1),
        "linear": _logits(head, a @ lin.T).argmax(-1),
    }
    row = {
        "task": task,
        "agreement_merged": float((preds["merged"] == expert_pred).double().mean()),
        "agreement_procrustes": float((preds["procrustes"] == expert_pred).double().mean()),
        "agreement_linear": float((preds["linear"] == expert_pred).double().mean()),
        "residual_identity": r_id,
        "residual_procrustes": r_q,
        "residual_linear": r_lin,
        "orthogonal_share": float(share),
        "linear_singular_value_ratio": float(sv.max() / sv.min().clamp_min(1e-12)),
        "linear_polar_distance": polar,
        "rotation_angle_max_deg": float(rotation_angles(q).max() * 180 / np.pi),
    }
    if y is not None:
        row.update({f"accuracy_{k}": float((v == y).double().mean()) for k, v in preds.items()})
        row["accuracy_expert"] = float((expert_pred == y).double().mean())
        row["knn_merged"] = _knn_accuracy(a.float(), y, n_neighbors)
        row["knn_expert"] = _knn_accuracy(b.float(), y, n_neighbors)
    if share != share:  # nan
        row["verdict"] = "inconclusive: no linear map reduces the held-out residual"
    else:
        row["verdict"] = "orthogonal" if share >= threshold and polar <= max_distortion else "not orthogonal"
    return row


def mask_statistics(merger) -> list[dict]:
    """Per state-dict tensor of a fitted ``MOMAMerger``: entries and the fraction its mask keeps.

    Parameters
    ----------
    merger : MOMAMerger
        A fitted merger.

    Returns
    -------
    list of dict
        One row per tensor: ``tensor``, ``numel``, ``kept``, ``kept_fraction``.

    Examples
    --------
    >>> from momaestimator import MOMAMerger, toy
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> m = MOMAMerger(pre, experts, heads, sparsity=0.5, n_steps=2, random_state=0).fit(data)
    >>> stats = mask_statistics(m)
    >>> round(sum(s["kept"] for s in stats) / sum(s["numel"] for s in stats), 2)
    0.5
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(merger, "mask_")
    return [
        {"tensor": k, "numel": int(m.numel()), "kept": int(m.sum()), "kept_fraction": float(m.float().mean())}
        for k, m in merger.mask_.items()
    ]


def rotation_statistics(merger) -> list[dict]:
    """Per task of a fitted ``MOMAMerger``: distance of ``Q_t`` from the identity and its rotation angles.

    Parameters
    ----------
    merger : MOMAMerger
        A fitted merger.

    Returns
    -------
    list of dict
        One row per task: ``task``, ``frobenius_from_identity``, ``max_angle_deg``,
        ``mean_angle_deg``.

    Examples
    --------
    >>> from momaestimator import MOMAMerger, toy
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> m = MOMAMerger(pre, experts, heads, n_steps=0).fit(data)
    >>> rotation_statistics(m)[0]["max_angle_deg"]
    0.0
    """
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(merger, "rotations_")
    out = []
    for t, q in merger.rotations_.items():
        ang = rotation_angles(q) * 180 / np.pi
        eye = torch.eye(q.shape[0], dtype=q.dtype)
        out.append(
            {
                "task": t,
                "frobenius_from_identity": float((q - eye).norm()),
                "max_angle_deg": float(ang.max()),
                "mean_angle_deg": float(ang.mean()),
            }
        )
    return out


def plot_misalignment(rows, ax=None):
    """Bar chart of the residuals (identity / Procrustes / linear) per task; returns the axes.

    Parameters
    ----------
    rows : list of dict
        The output of :func:`misalignment_report`.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when omitted.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> from momaestimator import toy
    >>> from momaestimator.analysis import misalignment_report, plot_misalignment
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> ax = plot_misalignment(misalignment_report(pre, experts, heads, data))
    >>> [t.get_text() for t in ax.get_xticklabels()]
    ['task0', 'task1']
    """
    import matplotlib.pyplot as plt

    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    tasks = [r["task"] for r in rows]
    pos = np.arange(len(tasks))
    for i, key in enumerate(["residual_identity", "residual_procrustes", "residual_linear"]):
        ax.bar(pos + (i - 1) * 0.27, [r[key] for r in rows], 0.27, label=key.replace("residual_", ""))
    ax.set_xticks(pos, tasks)
    ax.set_ylabel("relative residual to expert features")
    ax.legend()
    return ax


def plot_mask_statistics(merger, ax=None):
    """Fraction of each tensor's entries the fitted mask keeps; returns the axes.

    Parameters
    ----------
    merger : MOMAMerger
        A fitted merger.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when omitted.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> from momaestimator import MOMAMerger, toy
    >>> from momaestimator.analysis import plot_mask_statistics
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> merger = MOMAMerger(pre, experts, heads, sparsity=0.3, n_steps=2, random_state=0).fit(data)
    >>> ax = plot_mask_statistics(merger)
    >>> len(ax.patches) == len(merger.mask_)
    True
    """
    import matplotlib.pyplot as plt

    stats = mask_statistics(merger)
    ax = ax or plt.subplots(figsize=(7, 3.5))[1]
    ax.barh(range(len(stats)), [s["kept_fraction"] for s in stats])
    ax.set_yticks(range(len(stats)), [s["tensor"] for s in stats], fontsize=6)
    ax.set_xlabel("fraction of τ_MT kept")
    return ax


def plot_history(merger, ax=None):
    """Fit loss (and held-out loss) of a fitted merger; returns the axes.

    Parameters
    ----------
    merger : MOMAMerger
        A fitted merger.
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when omitted.

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> from momaestimator import MOMAMerger, toy
    >>> from momaestimator.analysis import plot_history
    >>> pre, experts, heads, data = toy.make_problem(n_tasks=2)
    >>> merger = MOMAMerger(pre, experts, heads, n_steps=20, validation_fraction=0.2, random_state=0).fit(data)
    >>> ax = plot_history(merger)
    >>> [line.get_label() for line in ax.get_lines()]
    ['fit', 'held-out']
    """
    import matplotlib.pyplot as plt
    from sklearn.utils.validation import check_is_fitted

    check_is_fitted(merger, "history_")
    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    h = merger.history_
    ax.plot([r["step"] for r in h], [r["loss"] for r in h], label="fit")
    val = [(r["step"], r["valid_loss"]) for r in h if "valid_loss" in r]
    if val:
        ax.plot(*zip(*val), "o--", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    return ax
