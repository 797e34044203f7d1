#!/usr/bin/env bash
# GPU checks in one go, on a machine with CUDA and PyTorch installed:
#   1. the `gpu`-marked tests (CPU/GPU parity of the absorbed model, user modules on their own
#      device, task batchings, mixed precision),
#   2. the scale benchmark on CUDA: ViT-B/32 T=2/4/8 (MOMA sequential and joint, each with CUDA graphs
#      and eager (GRAPHS="on off"), AdaMerging), ViT-L/14 T=2, and ViT-B/32 T=8 with bf16 autocast,
#   2b. ViT-B/32 T=2/4/8 with gradient checkpointing (2 and 4 tasks per pass, sequential; graphs on),
#   2c. ViT-B/32 T=2/8 with the merged weights made inside the blocks (recompute_merged_weights;
#       sequential and 2 tasks per pass, no checkpointing; graphs on),
#   3. optionally (BASELINE=dir holding another checkout's momaestimator/ package): the ViT-B/32 T=8
#      MOMA rows of that code on the same GPU, for a before/after comparison,
#   4. torch.compile of the encoder pass: compile seconds and pass seconds against eager (measured
#      once, see the scaling guide; skipped unless COMPILE_S is set).
# Extra wheels (open_clip_torch, ftfy, wcwidth) may be put in .whl/ when the machine has no index.
# Results go to ${OUT:-gpu-out}/. Each part has its own time limit (seconds): TESTS_S, B32_S, CKPT_S, REMERGE_S, BASE_S,
# L14_S, BF16_S, COMPILE_S; a part whose limit is 0 is skipped.
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
GRAPHS=${GRAPHS:-on off}
part gpu_tests "${TESTS_S:-180}" $PY -m pytest -q -ra -p no:cacheprovider -o addopts="" tests/test_gpu.py
part scale_cuda_b32 "${B32_S:-220}" $SCALE --tasks 2 4 8 --methods moma adamerging_layerwise \
  --task-batching sequential joint --cuda-graphs $GRAPHS --out "$OUT/scale_cuda_b32.json"
part scale_cuda_ckpt "${CKPT_S:-100}" $SCALE --tasks 2 4 8 --methods moma --task-batching 2 4 sequential \
  --gradient-checkpointing on --out "$OUT/scale_cuda_ckpt.json"
part scale_cuda_remerge "${REMERGE_S:-80}" $SCALE --tasks 2 8 --methods moma --task-batching sequential 2 \
  --recompute-merged-weights on --out "$OUT/scale_cuda_remerge.json"
if [ -n "${BASELINE:-}" ]; then
  PYTHONPATH=$BASELINE:$PYTHONPATH part scale_cuda_b32_baseline "${BASE_S:-60}" $SCALE --tasks 8 --methods moma \
    --task-batching sequential joint --out "$OUT/scale_cuda_b32_baseline.json"
fi
part scale_cuda_l14 "${L14_S:-80}" $SCALE --model ViT-L-14 --tasks 2 --methods moma --task-batching sequential joint \
  --gradient-checkpointing off on --out "$OUT/scale_cuda_l14.json"
part scale_cuda_bf16 "${BF16_S:-40}" $SCALE --tasks 8 --methods moma --task-batching sequential --precision bf16 \
  --cuda-graphs $GRAPHS --out "$OUT/scale_cuda_bf16.json"
part compile "${COMPILE_S:-0}" $PY scripts/compile_check.py cuda 16 128
