"""
Running the embedded benchmark
==============================

A walkthrough (rendered, not executed: the full run takes a while on a CPU) of ``moma-bench``, the
offline real-image benchmark of MOMA against the baselines. From a shell::

    bash scripts/setup.sh bench && .venv/bin/moma-bench --out bench-out

builds (once, cached) a zoo of small open_clip ViT experts on eight grey image tasks whose images
ship inside packages, runs every method with the same budget, prints the comparison table and
writes ``bench-out/report.md``, ``report.json`` and plots. The latest table is on the
:doc:`/benchmark_results` page.
"""

# %%
# The same from Python
# --------------------
# ``main`` takes the command-line arguments as a list. ``--quick`` runs a reduced zoo and budget
# (a few minutes, used in CI); ``--seeds`` averages over several fit-data samples and method seeds;
# ``--transductive`` fits on the unlabeled test inputs instead of 5 images per class of the train
# split.

from momaestimator.bench.__main__ import main

main(
    ["--quick", "--methods", "task_arithmetic", "moma", "moma_mask_only", "moma_rotation_only", "--out", "bench-quick"]
)

# %%
# Reading the report
# ------------------
# ``report.json`` holds everything the table shows, per method: per-task accuracy, mean,
# normalised mean (accuracy over the individual expert's), extra inference parameters, fit time
# and peak memory, plus the protocol and the machine.

import json

with open("bench-quick/report.json") as f:
    report = json.load(f)
for name, row in report["methods"].items():
    print(f"{name:22s} mean {row['mean']:.1f}  norm. {row['normalized_mean']:.1f}  extra params {row['extra_params']}")
