#!/usr/bin/env bash
# One device run for issue 4's in-graph hierarchy: GPU tests (captured graphs of both resolve
# paths, syncs forbidden; fused == torch; row_stats; page directory on CUDA)
# and the Llama-8B-shaped decode-step benchmark. Carry `.whl` (pydantic & co for the imports).
set -uo pipefail
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 || exit 1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -m pytest -q -m gpu tests/runtime/test_hierarchy.py tests/runtime/test_hierarchy_gpu.py \
  tests/control/test_page_directory.py \
  -p no:cacheprovider 2>&1 | tee "$OUT/pytest_hierarchy_gpu.log" | tail -25
python3 -m spinserve.perf.bench_decode_step --out "$OUT" "$@" 2>&1 \
  | tee "$OUT/bench_decode_step.log" | tail -30
