"""Regenerate ``docs/api.rst`` from the ``__all__`` of the documented modules.

Run ``.venv/bin/python docs/make_api_rst.py`` after adding a public name; ``tests/test_docstrings.py``
fails when ``api.rst`` misses one. Each object is documented once, under the first module (in the
order below) that exports it; later modules that re-export it say so.
"""

import importlib
import inspect
from pathlib import Path

SECTIONS = [
    (
        "momaestimator",
        "The estimator",
        "The scikit-learn estimator, the merged model it returns, and the data and "
        "model-selection helpers re-exported at the top level.",
    ),
    (
        "momaestimator.merging",
        "Merging core (pure torch)",
        "Base merges on state dicts, MOMA's mask and rotations, "
        "objectives and the fitting loop. Never imports scikit-learn.",
    ),
    ("momaestimator.model_selection", "Model selection", "Cross-validation splitters for per-task data."),
    ("momaestimator.metrics", "Metrics", "Per-task accuracy and scorers for scikit-learn model selection."),
    ("momaestimator.data", "Data", "Per-task inputs: the indexable ``TaskSamples`` view and input normalisation."),
    ("momaestimator.models", "Models", "The modules ``transform()`` returns."),
    ("momaestimator.baselines", "Baselines", "The methods MOMA is compared with, behind the same estimator API."),
    (
        "momaestimator.analysis",
        "Analysis",
        "Is the misalignment a rotation? What did the mask and the rotations learn?",
    ),
    (
        "momaestimator.checkpoints",
        "Real checkpoints",
        "Loading the task_vectors / TALL-masks releases and open_clip towers, safe unpickling, saving merged models.",
    ),
    ("momaestimator.toy", "Toy problems", "Tiny open_clip towers, experts and heads for tests and examples."),
]


def render() -> str:
    out = [
        ".. _api:",
        "",
        "API reference",
        "=============",
        "",
        "Every public name of the package (the ``__all__`` of each module below). An object exported by",
        "several modules is documented once, under the first of them here.",
        "",
    ]
    seen = {}
    for modname, title, blurb in SECTIONS:
        mod = importlib.import_module(modname)
        heading = f"``{modname}``: {title}"
        out += [heading, "-" * len(heading), "", f".. automodule:: {modname}", "   :no-members:", "   :no-index:", ""]
        out += [blurb, "", f".. currentmodule:: {modname}", ""]
        groups = {"Classes": [], "Functions": [], "Constants": []}
        again = []
        for name in sorted(mod.__all__, key=str.lower):
            obj = getattr(mod, name)
            if inspect.ismodule(obj):
                continue
            key = id(obj) if (inspect.isclass(obj) or callable(obj)) else (modname, name)
            if key in seen:
                again.append(f":obj:`{name} <{seen[key]}>`")
                continue
            seen[key] = f"{modname}.{name}"
            kind = "Classes" if inspect.isclass(obj) else "Functions" if callable(obj) else "Constants"
            groups[kind].append(name)
        for kind, names in groups.items():
            if not names:
                continue
            # pages use docs/_templates/autosummary/{class,function}.rst, chosen by object type
            out += (
                [f".. rubric:: {kind}", "", ".. autosummary::", "   :toctree: generated/", ""]
                + [f"   {n}" for n in names]
                + [""]
            )
        if again:
            out += ["Also exported here: " + ", ".join(again) + ".", ""]
    return "\n".join(out)


if __name__ == "__main__":
    Path(__file__).with_name("api.rst").write_text(render())
