"""PeakMemory sees an allocation made inside the block (fresh process: nothing freed to reuse)."""

import subprocess
import sys

CODE = """
import torch
from momaestimator.bench.measure import PeakMemory
with PeakMemory() as m:
    x = torch.ones(50_000_000)  # 200 MB, written
    del x
with PeakMemory() as small:
    y = torch.ones(10)
print(m.peak_mb, small.peak_mb)
"""


def test_peak_memory_measures_a_transient_200_mb_allocation():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True)
    big, small = map(float, out.stdout.split())
    assert 150 < big < 400, big  # freed before the block ends: only the sampling thread can see it
    assert small < 50, small
