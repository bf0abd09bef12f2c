#!/usr/bin/env bash
# One device run for serving (issue 6): SmolLM2 through HTTP on the GPU, 1/16/64 clients.
# Needs the two carries of ../shared/device/README.md (.stage/a first, then .stage/b + .whl).
set -uo pipefail
bash .stage/b/setup-remote.sh >/dev/null || exit 1
export PYTHONPATH=/tmp/site SPIN_EMBEDDED_GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
export SPIN_CACHE_DIR=/tmp/spincache PYTHONUNBUFFERED=1
python3 -m spinserve.perf.bench_http --out "$OUT" 2>&1 | grep -v "it/s\]" | tee "$OUT/bench_http.log" | tail -25
