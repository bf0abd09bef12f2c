#!/usr/bin/env bash
# One device run for the step-planned selection (fewer kernels per decode layer: select writes
# page ids / slots, fold + score fused, SwiGLU fused): the new kernels' GPU tests at real shapes,
# the graph / static-path equality and parity tests, then the Llama-8B-shaped decode step
# (batch 32 x 32K, budget 2048) and the selection cost. Carry `.whl` (pydantic & co).
# Usage: bash perf/gpu_select.sh [bench_decode_step args]   (logs and results under $OUT)
set -uo pipefail
bash perf/gpu_tests.sh tests/plugins/test_select_entries.py tests/plugins/test_fold_score.py \
  tests/plugins/test_glue.py tests/plugins/test_kernels_gpu.py \
  tests/control/test_engine_static_decode.py tests/runtime/test_cuda_graph_gpu.py \
  tests/runtime/test_model_parity_gpu.py tests/runtime/test_hierarchy_gpu.py
status=$?
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=/tmp/numba
python3 -m spinserve.perf.bench_decode_step --out "$OUT" --parts abc "$@" 2>&1 \
  | tee "$OUT/bench_decode_step.log" | tail -12
python3 -m spinserve.perf.bench_select_cost --out "$OUT" --algorithms quest,streaming 2>&1 \
  | tail -3
exit $status
