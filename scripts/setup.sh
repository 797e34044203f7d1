#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with everything the
# requested job needs. Idempotent: re-running only installs what is missing.
#   bash scripts/setup.sh test    # library + test tools (+ benchmark data, which tests use)
#   bash scripts/setup.sh bench   # library + benchmark data and plotting
#   bash scripts/setup.sh docs    # library + Sphinx toolchain (+ benchmark data for the gallery)
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-test}"
PY="${PYTHON:-python3}"

[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip=(.venv/bin/python -m pip install --disable-pip-version-check -q)

# torch first, pinned: unpinned, pip would resolve a multi-GB CUDA build from the index.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  case "$(uname -m)" in
    aarch64|arm64) "${pip[@]}" torch==2.9.1 torchvision==0.24.1 ;;
    *) "${pip[@]}" torch==2.14.1 torchvision==0.29.1 ;;
  esac
fi

# Benchmark data that ships in system packages (Fashion-MNIST); skipped when not root or no apt.
if [ "$job" != "lib" ] && [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 ||
      (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)) ||
      echo "setup: could not apt-get install dataset-fashion-mnist (benchmark tasks fashion_* unavailable)" >&2
  else
    echo "setup: run 'sudo apt-get install dataset-fashion-mnist' for the Fashion-MNIST benchmark tasks" >&2
  fi
fi

case "$job" in
  test)
    "${pip[@]}" -e ".[test]"
    # FusionBench's reference TIES code, for parity tests only; its full dependency tree is not needed.
    "${pip[@]}" --no-deps fusion-bench==0.2.33
    ;;
  bench) "${pip[@]}" -e ".[bench]" ;;
  docs) "${pip[@]}" -e ".[docs]" ;;
  lib) "${pip[@]}" -e . ;;
  *) echo "usage: $0 {test|bench|docs|lib}" >&2; exit 2 ;;
esac
# animal silhouettes: the wheel declares tensorflow, which the data file does not need.
if [ "$job" != "lib" ]; then
  .venv/bin/python -c "import animal_mnist" 2>/dev/null || "${pip[@]}" --no-deps animal-mnist==0.4 || true
fi
echo "setup: .venv ready for '$job'"
