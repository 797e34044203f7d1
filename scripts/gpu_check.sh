#!/usr/bin/env bash
# GPU checks in one go (one device call: the parts' default limits sum to 460 s), on a machine with
# CUDA and PyTorch installed:
#   1. the `gpu`-marked tests (CPU/GPU parity of the absorbed model, user modules on their own
#      device, task batchings, CUDA graphs, checkpointing, mixed precision; 15 s on an H100),
#   2. the scale benchmark on CUDA: ViT-B/32 T=2/4/8 (MOMA sequential and joint, AdaMerging) at
#      batch 16 (CUDA graphs on; GRAPHS="on off" adds the eager rows),
#   2b. ViT-B/32 T=2/8, batch 16, with gradient checkpointing (4 tasks per pass, and sequential),
#   2c. ViT-B/32 T=2/8, batch 64 per task, sequential, checkpointing off and on,
#   2d. optionally (REMERGE_S): T=2/8 with the merged weights made inside the blocks,
#   3. optionally (BASELINE=dir holding another checkout's momaestimator/ package): the ViT-B/32 T=8
#      MOMA rows of that code on the same GPU, for a before/after comparison (the same machine:
#      hosts differ, one-task-per-pass steps by up to 1.5x between two H100 machines),
#   4. ViT-L/14 T=2 sequential, checkpointing off and on; ViT-B/32 T=8 with bf16 autocast,
#   5. torch.compile of the encoder pass: compile seconds and pass seconds against eager (measured
#      once, see the scaling guide; skipped unless COMPILE_S is set).
# Extra wheels (open_clip_torch, ftfy, wcwidth, skorch) may be put in .whl/ when the machine has no
# index (README of the device tool: pip download --python-version 3.12 ... -d .whl).
# Results go to ${OUT:-gpu-out}/. Each part has its own time limit (seconds): TESTS_S, B32_S, CKPT_S,
# B64_S, REMERGE_S, BASE_S, L14_S, BF16_S, COMPILE_S; a part whose limit is 0 is skipped.
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
part() {  # part NAME LIMIT_S COMMAND...: run unless its limit is 0
  local name=$1 limit=$2
  shift 2
  [ "$limit" = 0 ] && { echo "== $name: skipped"; return; }
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
}
SCALE="$PY -m momaestimator.bench.scale --device cuda --batch-size ${BATCH:-16} --n-steps ${STEPS:-6}"
GRAPHS=${GRAPHS:-on}
part gpu_tests "${TESTS_S:-60}" $PY -m pytest -q -ra -p no:cacheprovider -o addopts="" tests/test_gpu.py
part scale_cuda_b32 "${B32_S:-150}" $SCALE --tasks 2 4 8 --methods moma adamerging_layerwise \
  --task-batching sequential joint --cuda-graphs $GRAPHS --out "$OUT/scale_cuda_b32.json"
part scale_cuda_ckpt "${CKPT_S:-70}" $SCALE --tasks 2 8 --methods moma --task-batching 4 sequential \
  --gradient-checkpointing on --out "$OUT/scale_cuda_ckpt.json"
part scale_cuda_b64 "${B64_S:-70}" $PY -m momaestimator.bench.scale --device cuda --batch-size 64 \
  --n-steps "${STEPS:-6}" --tasks 2 8 --methods moma --task-batching sequential --gradient-checkpointing off on \
  --out "$OUT/scale_cuda_b64.json"
part scale_cuda_remerge "${REMERGE_S:-0}" $SCALE --tasks 2 8 --methods moma --task-batching sequential 4 \
  --gradient-checkpointing on --recompute-merged-weights on --out "$OUT/scale_cuda_remerge.json"
if [ -n "${BASELINE:-}" ]; then
  PYTHONPATH=$BASELINE:$PYTHONPATH part scale_cuda_b32_baseline "${BASE_S:-60}" $SCALE --tasks 8 --methods moma \
    --task-batching sequential joint --out "$OUT/scale_cuda_b32_baseline.json"
fi
part scale_cuda_l14 "${L14_S:-70}" $SCALE --model ViT-L-14 --tasks 2 --methods moma --task-batching sequential \
  --gradient-checkpointing off on --out "$OUT/scale_cuda_l14.json"
part scale_cuda_bf16 "${BF16_S:-40}" $SCALE --tasks 8 --methods moma --task-batching sequential --precision bf16 \
  --cuda-graphs $GRAPHS --out "$OUT/scale_cuda_bf16.json"
part compile "${COMPILE_S:-0}" $PY scripts/compile_check.py cuda 16 128
