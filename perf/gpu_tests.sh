#!/usr/bin/env bash
# The GPU test suite (`pytest -m gpu`) on the device machine. Carry `.whl` (pydantic & co, see
# ../shared/device/README.md); tests that need the embedded SmolLM2 find it only when .stage
# was carried too (setup-remote.sh), the rest build tiny checkpoints with transformers.
# Usage: bash perf/gpu_tests.sh [pytest args...]   (writes $OUT/pytest_gpu.log)
set -uo pipefail
bash .stage/b/setup-remote.sh >/dev/null 2>&1 || {
  mkdir -p /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
    .whl/*.whl >/dev/null 2>&1
  PYTHONPATH=/tmp/site python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
    >/dev/null 2>&1 || exit 1
}
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba
m=$(ls /tmp/models/*.gguf 2>/dev/null | head -1 || true)
[ -n "$m" ] && export SPIN_EMBEDDED_GGUF=$m
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 "${@:-tests}" 2>&1 \
  | tee "$OUT/pytest_gpu.log" | tail -60
