#!/usr/bin/env bash
# One device run for the foundation: bf16 parity tests on CUDA + SmolLM2 decode benchmark.
# Needs the two carries of ../shared/device/README.md (.stage/a in a first call, then .stage/b + .whl).
set -uo pipefail
bash .stage/b/setup-remote.sh >/dev/null || exit 1
export PYTHONPATH=/tmp/site SPIN_EMBEDDED_GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
export SPIN_CACHE_DIR=/tmp/spincache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -m pytest -q -m gpu tests/runtime/test_model_parity_gpu.py tests/runtime/test_cuda_graph_gpu.py -p no:cacheprovider 2>&1 \
  | tee "$OUT/pytest_gpu_parity.log" | tail -5
python3 -m spinserve.perf.bench_decode --out "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/bench_decode.log" | tail -6
