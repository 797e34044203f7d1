#!/usr/bin/env bash
# GPU checks in one go, on a machine with CUDA and PyTorch installed:
#   1. the `gpu`-marked tests (CPU/GPU parity of the absorbed model, user modules on their own
#      device, task batchings, mixed precision),
#   2. the scale benchmark on CUDA: ViT-B/32 T=2/4/8 (MOMA sequential and joint, AdaMerging),
#      ViT-L/14 T=2, and ViT-B/32 T=8 with bf16 autocast.
#   3. optionally (BASELINE=dir holding another checkout's momaestimator/ package): the ViT-B/32 T=8
#      MOMA rows of that code on the same GPU, for a before/after comparison.
# Extra wheels (open_clip_torch, ftfy, wcwidth) may be put in .whl/ when the machine has no index.
# Results go to ${OUT:-gpu-out}/. Each part has its own time limit (seconds): TESTS_S, B32_S, BASE_S, L14_S,
# BF16_S.
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
$PY -c "import torch, open_clip; print('torch', torch.__version__, 'open_clip', open_clip.__version__)"
timeout "${TESTS_S:-60}" $PY -m pytest -q -ra -p no:cacheprovider -o addopts="" tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.txt"
SCALE="$PY -m momaestimator.bench.scale --device cuda --batch-size ${BATCH:-16} --n-steps ${STEPS:-5}"
timeout "${B32_S:-150}" $SCALE --tasks 2 4 8 --methods moma adamerging_layerwise --task-batching sequential joint \
  --out "$OUT/scale_cuda_b32.json" 2>&1 | tee "$OUT/scale_cuda_b32.txt"
if [ -n "${BASELINE:-}" ]; then
  PYTHONPATH=$BASELINE:$PYTHONPATH timeout "${BASE_S:-60}" $SCALE --tasks 8 --methods moma \
    --task-batching sequential joint --out "$OUT/scale_cuda_b32_baseline.json" 2>&1 | tee "$OUT/scale_cuda_b32_baseline.txt"
fi
timeout "${L14_S:-80}" $SCALE --model ViT-L-14 --tasks 2 --methods moma --task-batching sequential joint \
  --out "$OUT/scale_cuda_l14.json" 2>&1 | tee "$OUT/scale_cuda_l14.txt"
timeout "${BF16_S:-40}" $SCALE --tasks 8 --methods moma --task-batching sequential --precision bf16 \
  --out "$OUT/scale_cuda_bf16.json" 2>&1 | tee "$OUT/scale_cuda_bf16.txt"
