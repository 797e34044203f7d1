"""Run every method on the embedded zoo and collect one report.

Protocol (written into the report): the zoo (pretrained tower, frozen heads, experts) is built
once per ``zoo_seed``; for each seed, the unlabeled fit data is drawn — by default
``samples_per_class`` images per class from each task's *train* split (the MOMA authors'
protocol; labels only pick a class-balanced sample), or with ``transductive=True`` the task's
unlabeled *test* inputs (AdaMerging/Surgery's protocol). The scale λ of Task Arithmetic and of
TIES is chosen on each task's validation split from :data:`LAMBDA_GRID` and every method built on
that base uses the same λ. All accuracies are on the test split.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict

import numpy as np
import torch

from ..analysis import mask_statistics, misalignment_report, rotation_statistics
from ..baselines import IndividualExperts, PretrainedHeads, TaskArithmetic, TiesMerging
from .measure import PeakMemory
from .methods import DATA_METHODS, METHODS, MethodSettings, make_method

__all__ = ["LAMBDA_GRID", "few_shot_indices", "run_benchmark", "select_scaling"]

LAMBDA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))


def few_shot_indices(y: torch.Tensor, per_class: int, seed: int) -> np.ndarray:
    """Class-balanced sample of ``per_class`` indices per class (labels pick the sample, never the loss).

    Examples
    --------
    >>> import torch
    >>> few_shot_indices(torch.tensor([0, 0, 0, 1, 1, 1]), 2, seed=0).size
    4
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(y)
    picks = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    return np.sort(np.concatenate(picks))


def select_scaling(cls, models, val_data, grid=LAMBDA_GRID, **kw):
    """λ maximising mean validation accuracy of a static merge; returns ``(λ, {λ: accuracy})``."""
    curve = {lam: cls(*models, scaling=lam, **kw).fit().score(val_data) for lam in grid}
    best = max(curve, key=lambda lam: (curve[lam], -lam))
    return best, curve


def _fit_data(zoo, tasks, seed, samples_per_class, transductive):
    if transductive:
        return {t: zoo.data[t].X_test for t in tasks}
    return {t: zoo.data[t].X_train[few_shot_indices(zoo.data[t].y_train, samples_per_class, seed)] for t in tasks}


def run_benchmark(
    zoo,
    *,
    methods=None,
    seeds=(0,),
    samples_per_class=5,
    transductive=False,
    n_steps=200,
    device="cpu",
    analysis=True,
    log=print,
) -> dict:
    """Run ``methods`` on ``zoo`` for each seed; return the report dict (see :mod:`momaestimator.bench`)."""
    methods = list(methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected a subset of {list(METHODS)}")
    tasks = list(zoo.tasks)
    models = (zoo.pretrained, {t: zoo.experts[t] for t in tasks}, {t: zoo.heads[t] for t in tasks})
    val = {t: (zoo.data[t].X_val, zoo.data[t].y_val) for t in tasks}
    test = {t: (zoo.data[t].X_test, zoo.data[t].y_test) for t in tasks}

    t0 = time.perf_counter()
    ta_lambda, ta_curve = select_scaling(TaskArithmetic, models, val)
    ties_lambda, ties_curve = select_scaling(TiesMerging, models, val, top_k=0.2)
    pre_acc = PretrainedHeads(*models).fit().score_per_task(test)
    ind_acc = IndividualExperts(*models).fit().score_per_task(test)
    ta_acc = TaskArithmetic(*models, scaling=ta_lambda).fit().score_per_task(test)
    log(f"λ chosen on validation: task arithmetic {ta_lambda}, TIES {ties_lambda} ({time.perf_counter() - t0:.1f} s)")
    regime = {
        "pretrained": 100 * float(np.mean(list(pre_acc.values()))),
        "task_arithmetic": 100 * float(np.mean(list(ta_acc.values()))),
        "lambda": ta_lambda,
        "individual": 100 * float(np.mean(list(ind_acc.values()))),
    }
    gap = regime["individual"] - regime["pretrained"]
    regime["recovered_fraction"] = (regime["task_arithmetic"] - regime["pretrained"]) / gap if gap else float("nan")
    regime["ta_validation_curve"] = {str(k): 100 * v for k, v in ta_curve.items()}
    regime["ties_lambda"] = ties_lambda
    regime["ties_validation_curve"] = {str(k): 100 * v for k, v in ties_curve.items()}

    runs = {m: [] for m in methods}
    fitted_moma = None
    for seed in seeds:
        settings = MethodSettings(
            ta_scaling=ta_lambda, ties_scaling=ties_lambda, n_steps=n_steps, seed=seed, device=device
        )
        X_fit = _fit_data(zoo, tasks, seed, samples_per_class, transductive)
        for name in methods:
            est = make_method(name, models, settings)
            with PeakMemory(device) as mem:
                est.fit(X_fit if name in DATA_METHODS else None)
                model = est.transform()
            del model
            acc = est.score_per_task(test)
            row = {
                "per_task": {t: 100 * acc[t] for t in tasks},
                "mean": 100 * float(np.mean(list(acc.values()))),
                "normalized_mean": 100 * float(np.mean([acc[t] / ind_acc[t] for t in tasks])),
                "extra_params": int(est.extra_params_) if hasattr(est, "extra_params_") else 0,
                "fit_seconds": mem.seconds,
                "peak_memory_mb": mem.peak_mb,
            }
            if hasattr(est, "best_step_"):  # the step early stopping kept (0: the starting merge)
                row["kept_step"] = int(est.best_step_)
            if hasattr(est, "history_"):
                row["history"] = [{k: v for k, v in h.items() if k != "per_task_loss"} for h in est.history_]
            if name == "moma" and fitted_moma is None:
                fitted_moma = est
            runs[name].append(row)
            log(
                f"seed {seed}  {name:<22} mean {row['mean']:5.1f}  norm {row['normalized_mean']:5.1f}  "
                f"fit {row['fit_seconds']:6.1f} s  peak +{row['peak_memory_mb']:7.1f} MB"
            )

    report = {
        "protocol": {
            "fit_data": "transductive: unlabeled test inputs"
            if transductive
            else f"few-shot: {samples_per_class} unlabeled images per class from each task's train split",
            "transductive": bool(transductive),
            "samples_per_class": None if transductive else samples_per_class,
            "seeds": list(seeds),
            "lambda_selection": f"grid {list(LAMBDA_GRID)} on each task's validation split (mean accuracy)",
            "n_steps": n_steps,
            "device": str(device),
            "zoo": {k: v for k, v in asdict(zoo.config).items()},
            "zoo_seed": getattr(zoo, "seed", 0),
            "zoo_build_seconds": getattr(zoo, "build_seconds", {}),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        },
        "tasks": tasks,
        "regime": regime,
        "methods": {m: _aggregate(rows) for m, rows in runs.items()},
    }
    if analysis and fitted_moma is not None:
        report["analysis"] = _analysis(zoo, models, fitted_moma, tasks, ta_lambda)
    return report


def _aggregate(rows):
    if len(rows) == 1:
        return rows[0]
    out = {
        "per_task": {t: float(np.mean([r["per_task"][t] for r in rows])) for t in rows[0]["per_task"]},
        "mean": float(np.mean([r["mean"] for r in rows])),
        "normalized_mean": float(np.mean([r["normalized_mean"] for r in rows])),
        "extra_params": rows[0]["extra_params"],
        "fit_seconds": float(
            np.median([r["fit_seconds"] for r in rows])
        ),  # one run per seed, no warm-up: the median resists an outlier
        "peak_memory_mb": float(np.mean([r["peak_memory_mb"] for r in rows])),
        # the sample standard deviation over seeds (ddof=1), as the report's "±" says
        "std": {
            "mean": float(np.std([r["mean"] for r in rows], ddof=1)),
            "normalized_mean": float(np.std([r["normalized_mean"] for r in rows], ddof=1)),
            "per_task": {t: float(np.std([r["per_task"][t] for r in rows], ddof=1)) for t in rows[0]["per_task"]},
        },
        "seeds": rows,
    }
    if "kept_step" in rows[0]:
        out["kept_step"] = [r["kept_step"] for r in rows]
    if "history" in rows[0]:
        out["history"] = rows[0]["history"]
    return out


def _analysis(zoo, models, merger, tasks, ta_lambda):
    # the maps are fitted on each task's validation inputs (hundreds per task; a diagnostic, not a
    # method, so it is not limited to the few-shot fit data) and measured on the test split
    val = {t: (zoo.data[t].X_val, zoo.data[t].y_val) for t in tasks}
    test = {t: (zoo.data[t].X_test, zoo.data[t].y_test) for t in tasks}
    rows = misalignment_report(*models, val, scaling=ta_lambda, X_eval=test)
    return {"misalignment": rows, "rotations": rotation_statistics(merger), "mask": mask_statistics(merger)}
