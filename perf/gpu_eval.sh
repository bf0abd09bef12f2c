#!/usr/bin/env bash
# Issue 5's accuracy grid in ONE device run (442 s on the H100 at af568db:
# perf/results/eval_accuracy_20261123T031230.json): SmolLM2 passkey at 8K/4K/2K, depths 0..100%
# in 10% steps,
# 3 keys per (context, depth), budgets 256/512/1024/2048, dense + streaming, quest, shadowkv,
# retroinfer; greedy agreement with dense over 64 tokens on every passkey prompt; perplexity on
# 3 held-out windows (Luke, Acts) per context. Per context every prompt is prefilled once and
# each (algorithm, budget) decodes the whole batch (36 requests) together (perf/eval_session.py).
# RECALL=1 adds perf/eval_recall.py at 8K (3 prompts): attention recall per layer, ~1 min more.
# Carries (../shared/device/README.md): .stage/a first, then .stage/b + .whl + .stage/eval
# (make the texts here with: python -m spinserve.perf.eval_accuracy --dump-text .stage/eval).
set -uo pipefail
bash .stage/b/setup-remote.sh >/dev/null || exit 1
export PYTHONPATH=/tmp/site SPIN_EMBEDDED_GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
export SPIN_CACHE_DIR=/tmp/spincache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
T=.stage/eval
python3 -c "from spinserve.engines.embedded import embedded_engine_dir as e; print(e(progress=False))"
SECONDS=0
python3 -m spinserve.perf.eval_accuracy --device cuda --contexts 8192,4096,2048 --trials 3 \
  --text-file $T/haystack.txt --held-out-file $T/held_out.txt --out "$OUT" "$@" \
  > "$OUT/eval_accuracy.log" 2>&1
echo "eval_accuracy rc=$? in ${SECONDS}s"
if [ "${RECALL:-0}" = 1 ]; then
  python3 -m spinserve.perf.eval_recall --device cuda --contexts 8192 --depths 0.2,0.5,0.8 \
    --text-file $T/haystack.txt --out "$OUT" > "$OUT/eval_recall.log" 2>&1
  echo "eval_recall rc=$?"; grep "^ctx" "$OUT/eval_recall.log"
fi
grep -v "^\[transformers\]" "$OUT/eval_accuracy.log" | tail -45
