"""The benchmark's outputs: a printed table, ``report.md``, ``report.json`` and PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["format_table", "write_report"]

LABELS = {
    "pretrained": "Pretrained + heads",
    "individual": "Individual experts",
    "weight_averaging": "Weight averaging",
    "task_arithmetic": "Task Arithmetic",
    "ties": "TIES-Merging",
    "adamerging_taskwise": "AdaMerging (task-wise)",
    "adamerging_layerwise": "AdaMerging (layer-wise)",
    "surgery": "Representation Surgery",
    "ft_classifier": "FT-Classifier (heads)",
    "procrustes": "Procrustes rotations",
    "moma_mask_only": "MOMA mask only",
    "moma_rotation_only": "MOMA rotation only",
    "moma": "MOMA (TA base)",
    "moma_ties": "MOMA (TIES base)",
    "moma_procrustes_init": "MOMA (Procrustes start)",
}


def _pm(row, key):
    std = row.get("std", {}).get(key)
    return f"{row[key]:.1f}" + (f" ± {std:.1f}" if std is not None else "")


def _kept(row) -> str:
    """The step early stopping kept, per seed (``0``: the fit returned its starting point); ``-``
    for a method without early stopping.
    """
    kept = row.get("kept_step")
    if kept is None:
        return "-"
    return "/".join(str(k) for k in (kept if isinstance(kept, list) else [kept]))


def format_table(report: dict, markdown: bool = False) -> str:
    """The comparison table: per-task accuracy, mean, normalised mean, extra params, fit time, memory.

    Examples
    --------
    >>> rep = {"tasks": ["a"], "methods": {"moma": {"per_task": {"a": 90.0}, "mean": 90.0,
    ...        "normalized_mean": 95.0, "extra_params": 0, "fit_seconds": 1.0, "peak_memory_mb": 2.0}}}
    >>> "MOMA (TA base)" in format_table(rep)
    True
    """
    tasks = report["tasks"]
    head = ["method", *tasks, "mean", "norm.", "extra params", "kept step", "fit s", "peak MB"]
    rows = []
    for name, r in report["methods"].items():
        rows.append(
            [
                LABELS.get(name, name),
                *(f"{r['per_task'][t]:.1f}" for t in tasks),
                _pm(r, "mean"),
                _pm(r, "normalized_mean"),
                f"{r['extra_params']:,}",
                _kept(r),
                f"{r['fit_seconds']:.1f}",
                f"{r['peak_memory_mb']:.0f}",
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def format_regime(report: dict) -> str:
    """One line with the regime numbers (pretrained, TA at λ*, individual, recovered fraction)."""
    g = report["regime"]
    return (
        f"regime: pretrained {g['pretrained']:.1f} → task arithmetic (λ*={g['lambda']}) "
        f"{g['task_arithmetic']:.1f} → individual {g['individual']:.1f}; TA recovers "
        f"{100 * g['recovered_fraction']:.0f} % of the gap (target 30–70 %)"
    )


def write_report(report: dict, out_dir) -> dict[str, str]:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``; return their paths."""
    from .._io import atomic_write

    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"), "md": os.path.join(out_dir, "report.md")}
    text = json.dumps(report, indent=1, default=float)
    atomic_write(paths["json"], lambda tmp: Path(tmp).write_text(text))
    p = report["protocol"]
    md = [
        "# momaestimator embedded benchmark",
        "",
        f"- fit data: {p['fit_data']}",
        f"- seeds: {p['seeds']}; λ selection: {p['lambda_selection']}; steps per learned method: {p['n_steps']}",
        f"- zoo: {p['zoo']}",
        *([_anchor_line(p["zoo"])] if isinstance(p.get("zoo"), dict) and p["zoo"].get("anchor_weight") else []),
        f"- machine: {p['machine']}",
        f"- {format_regime(report)}",
        "",
        "Accuracy in % on each task's test split, mean ± sample standard deviation (ddof=1) over seeds; "
        "norm. = mean over tasks of accuracy / individual expert's accuracy; extra params = inference "
        "parameters beyond one encoder + the original heads; fit s and peak MB = wall time and peak added "
        "memory of fit + transform (CPU: resident-set growth in this one process, after freed heap memory "
        "is returned to the system before each fit; indicative only, see the scaling benchmark for memory); "
        "fit s is the median over seeds of one run each, without warm-up: on a shared machine it varies "
        "several-fold between runs. kept step = the step whose state early stopping kept (lowest held-out "
        "objective), per seed; 0 means the fit returned its starting point (the base merge, or its "
        "Procrustes start).",
        f"- The ± covers the seeds' few-shot samples and the methods' random states{_fit_data_note(p)}, on "
        f"one zoo of experts (zoo seed {p.get('zoo_seed', 0)}); how much the zoo itself moves the numbers "
        "is not in it.",
        "",
        format_table(report, markdown=True),
    ]
    if report.get("analysis"):
        md += ["", "## Misalignment analysis (base merge vs experts)", "", _analysis_md(report["analysis"])]
    atomic_write(paths["md"], lambda tmp: Path(tmp).write_text("\n".join(md) + "\n"))
    paths.update(_plots(report, out_dir))
    return paths


def _fit_data_note(protocol: dict) -> str:
    if protocol.get("transductive"):
        return " (transductive: the fit inputs, every test input, are the same for every seed)"
    return ""


def _anchor_line(zoo: dict) -> str:
    return (
        f"- experts: fine-tuned with a feature anchor (weight {zoo['anchor_weight']:g}: cross-entropy plus "
        f"{zoo['anchor_weight']:g} × mean squared distance between the expert's and the pretrained tower's "
        "normalised features on generic images, no task images). Why: without it the experts moved so far "
        "that Task Arithmetic barely beat the pretrained tower (outside the field's regime, where it recovers "
        "about half of the pretrained → individual gap); see the regime line above."
    )


def _analysis_md(analysis) -> str:
    rows = analysis.get("misalignment") or []
    if not rows:
        return "(not available)"
    keys = [k for k in rows[0] if not isinstance(rows[0][k], (list, dict))]
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---" for _ in keys) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |")
    return "\n".join(lines)


def _plots(report, out_dir) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = {}
    tasks, methods = report["tasks"], report["methods"]
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(tasks) + 2), 4.5))
    width = 0.8 / len(methods)
    pos = np.arange(len(tasks))
    for i, (name, r) in enumerate(methods.items()):
        heights = [r["per_task"][t] for t in tasks]
        ax.bar(
            pos + i * width - 0.4 + width / 2, heights, width, label=LABELS.get(name, name), color=plt.cm.tab20(i % 20)
        )
    ax.set_xticks(pos, tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, ncol=2, loc="lower left")
    ax.set_title("Per-task accuracy by method")
    fig.tight_layout()
    out["per_task_png"] = os.path.join(out_dir, "per_task_accuracy.png")
    fig.savefig(out["per_task_png"], dpi=110)
    plt.close(fig)
    curves = {n: r["history"] for n, r in methods.items() if n.startswith("moma") and r.get("history")}
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for name, hist in curves.items():
            line = ax.plot([h["step"] for h in hist], [h["loss"] for h in hist], label=f"{LABELS[name]} (fit)")
            val = [(h["step"], h["valid_loss"]) for h in hist if "valid_loss" in h]
            if val:
                ax.plot(*zip(*val), "o--", color=line[0].get_color(), ms=3, label=f"{LABELS[name]} (held-out)")
        ax.set_xlabel("step")
        ax.set_ylabel("KL to experts (sum over tasks)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("MOMA loss")
        fig.tight_layout()
        out["loss_png"] = os.path.join(out_dir, "moma_loss.png")
        fig.savefig(out["loss_png"], dpi=110)
        plt.close(fig)
    return out
