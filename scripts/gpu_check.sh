#!/usr/bin/env bash
# GPU checks in one go (run on a machine with CUDA and PyTorch already installed):
#   1. the `gpu`-marked tests (CPU/GPU parity of the absorbed model, mixed precision),
#   2. the scale benchmark on CUDA (ViT-B/32 T=2/4/8 and ViT-L/14 T=2).
# Extra wheels (open_clip_torch, ftfy, wcwidth) may be put in .whl/ when the machine has no index.
# Results go to ${OUT:-gpu-out}/.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available())"
$PY -m pytest -q -ra -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
BATCH=${BATCH:-16}
STEPS=${STEPS:-5}
$PY -m momaestimator.bench.scale --device cuda --batch-size "$BATCH" --n-steps "$STEPS" \
  --tasks ${TASKS:-2 4 8} ${SCALE_ARGS:-} --out "$OUT/scale_cuda.json" 2>&1 | tee "$OUT/scale_cuda.txt"
