#!/usr/bin/env bash
# Issue 7 item 4(a), PREPARED BUT NOT YET RUN (no device time was left when it was written):
# SmolLM2 on the GPU, LongGenBench-like workload scaled to the 8K context, real KJV text, the HBM
# KV pool capped so that dense cannot hold the working set of the whole batch.
#   dense  = spinserve's dense mode with vLLM's policy: all KV in HBM, batch capped by HBM,
#            (recompute) preemption when short;
#   spin   = quest sparse attention + the hierarchical cache: the same HBM pool holds only each
#            request's working set, every page lives in the pinned host pool.
# Carries (../shared/device/README.md): .stage/a first, then .stage/b + .whl + .stage/text
# (make the text here with: python -m spinserve.perf.workloads --dump-text .stage/text/kjv.txt).
set -uo pipefail
bash .stage/b/setup-remote.sh >/dev/null || exit 1
export PYTHONPATH=/tmp/site SPIN_EMBEDDED_GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
export SPIN_CACHE_DIR=/tmp/spincache PYTHONUNBUFFERED=1
HBM_TOKENS=${HBM_TOKENS:-32768}   # KV pool: 4 requests of 8K when dense
common=(--device cuda --workload longgenbench --max-context 8192 --num-prompts 48
        --text-file .stage/text/kjv.txt --kv-cache-tokens "$HBM_TOKENS" --result-dir "$OUT"
        --save-detailed --no-progress --seed 0)
python3 -m spinserve.control.cli bench engine "${common[@]}" --label dense 2>&1 | tail -20
SPIN_SPARSE__ALGORITHM=quest SPIN_SPARSE__BUDGET_TOKENS=1024 SPIN_CACHE__HIERARCHY=true \
SPIN_CACHE__HOST_POOL_TOKENS=$((48 * 8192)) \
  python3 -m spinserve.control.cli bench engine "${common[@]}" --label spin 2>&1 | tail -20
python3 -m spinserve.control.cli bench plot "$OUT"/dense*.json "$OUT"/spin*.json \
  --out-prefix "$OUT/headline" 2>&1 | tail -3
