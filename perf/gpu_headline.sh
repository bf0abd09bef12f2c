#!/usr/bin/env bash
# Issue 7 item 4, the headline: spinserve's dense mode with vLLM's policy (all KV in HBM, batch
# capped by HBM, recompute preemption) against spin (quest sparse attention + the hierarchical
# cache: HBM holds each request's working set, every page lives in the pinned host pool). Both
# systems get the SAME HBM KV pool (cache.kv_cache_tokens); every run is `spinserve bench engine`
# with all requests sent at once, fixed output lengths (ignore_eos), one warm-up of 16 tokens.
#
#   bash perf/gpu_headline.sh a     SmolLM2-135M (embedded GGUF) on KJV text, LongGenBench-like
#                                   prompts fitted to 8K - A_OUT, A_OUT output tokens, 48 requests;
#                                   KV pool 32768 tokens = 4 x 8K (720 MiB): dense holds 4 requests;
#                                   spin: quest 1024 with a 1x HBM buffer (hit_rate_smollm2_cpu.json)
#   bash perf/gpu_headline.sh b     Llama-3.1-8B-shaped random engine, 12 requests of 31744 + 1024
#                                   tokens (32K context), text-rank prompt ids; KV pool 131072
#                                   tokens = 16 GiB: dense holds 4; spin host pool 12 x 32K = 48 GiB
#   bash perf/gpu_headline.sh b64   the same at 64K: 6 requests of 64512 + 1024; dense holds 2,
#                                   host pool 6 x 64K = 48 GiB (optional: run it if time allows)
#   bash perf/gpu_headline.sh all   a, b, b64 in turn (CPU smoke; on the H100 run one per call)
# Each part writes <part>-dense / <part>-spin JSON (+ logs) under $OUT, then `bench headline`
# writes headline-<part>.{json,md,png} (the PNG only where matplotlib is installed) and prints the
# table: throughput, TTFT, TPOT (spin/dense), mean batch, preemptions, hit rate, peak GPU memory.
# One table over several calls' results, here: spinserve bench headline DIR1/*-{dense,spin}*.json
#   DIR2/*-{dense,spin}*.json --out-prefix perf/results/headline_h100
#
# Device calls (../shared/device/README.md; pass SPIN_GIT_SHA=<sha> so the JSON names the commit):
#   part a, 2 calls:  carry [".stage/a"]: mkdir -p /tmp/stage && cp .stage/a/* /tmp/stage/
#                     carry [".stage/b", ".whl", ".stage/text"]: bash perf/gpu_headline.sh a
#   part b, 1 call:   carry [".whl", ".stage/text"]: bash perf/gpu_headline.sh b   (same for b64)
#   .stage/text/kjv.txt: python -m spinserve.perf.workloads --dump-text .stage/text/kjv.txt
#
# Sizes, device and setup are overridable by env (HEADLINE_*; SPIN_* settings pass through to
# both systems). CPU smoke with the tiny random preset: tests/perf/test_bench_engine.py
# (test_headline_script_cpu_smoke) runs part b; by hand, all parts:
#   OUT=/tmp/h HEADLINE_DEVICE=cpu HEADLINE_SETUP=0 HEADLINE_PYTHON=.venv/bin/python
#   HEADLINE_A_ENGINE=<a tiny-llama engine> HEADLINE_A_CTX=1024 HEADLINE_A_OUT=16 HEADLINE_A_N=6
#   HEADLINE_A_HBM=2048 HEADLINE_A_BUDGET=64 HEADLINE_B_PRESET=tiny-llama HEADLINE_B_CTX=1024 ...
#   SPIN_ENGINE__CPU_THREADS=1 bash perf/gpu_headline.sh all
set -uo pipefail
PART=${1:?usage: gpu_headline.sh a|b|b64|all}
: "${OUT:?set OUT to the results folder}"
PY=${HEADLINE_PYTHON:-python3}
DEVICE=${HEADLINE_DEVICE:-cuda}
TEXT=${HEADLINE_TEXT:-.stage/text/kjv.txt}
WORK=${HEADLINE_WORK:-/tmp/spin_headline}  # random-weight engine folders (a manifest, no weights)
RUN_TIMEOUT=${HEADLINE_RUN_TIMEOUT:-250}   # s per bench run: 2 runs + setup < 600 s
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR=${NUMBA_CACHE_DIR:-/tmp/numba}
mkdir -p "$OUT" "$WORK"
T0=$SECONDS

setup() {  # $1 = a | b: the device machine lacks pydantic & co (and the model for part a)
  [ "${HEADLINE_SETUP:-1}" = 1 ] || return 0
  if [ "$1" = a ]; then
    bash .stage/b/setup-remote.sh >/dev/null || { echo "setup-remote.sh failed"; exit 1; }
    export SPIN_EMBEDDED_GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
  else
    mkdir -p /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
      .whl/*.whl >/dev/null 2>&1
    python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
      || { echo "pip install -e . failed"; exit 1; }
  fi
  export PYTHONPATH=/tmp/site SPIN_CACHE_DIR=/tmp/spincache
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total \
    --format=csv,noheader
}

# bench LABEL ENV_ARRAY_NAME ARGS...: one `bench engine` run, its summary lines, its rc
bench() {
  local label=$1 envname=$2[@] t=$SECONDS rc
  shift 2
  echo "== $label: ${!envname} $*"
  env "${!envname}" timeout "$RUN_TIMEOUT" "$PY" -m spinserve.control.cli bench engine \
    --device "$DEVICE" --request-rate inf --num-warmups 1 --save-detailed --no-progress \
    --no-plots --result-dir "$OUT" --label "$label" "$@" >"$OUT/$label.log" 2>&1
  rc=$?
  grep -E "^(Successful|Failed requests|Benchmark duration|Output token|Mean TTFT|Mean TPOT|Mean \
running|Mean decode|Preemptions|HBM page hit|PCIe bytes|error|FAILED|  error)" "$OUT/$label.log" \
    | sed "s/^/   /"
  [ "$rc" = 0 ] || { echo "   rc=$rc (124 = timed out after ${RUN_TIMEOUT}s); log tail:"; \
    tail -5 "$OUT/$label.log" | sed "s/^/   /"; }
  echo "   $label: $((SECONDS - t)) s"
}

need_text() {
  [ -f "$TEXT" ] || { echo "no prompt text at $TEXT: make it with python -m" \
    "spinserve.perf.workloads --dump-text .stage/text/kjv.txt and carry .stage/text"; exit 1; }
}

headline() {  # $1 = part name: the table of its two runs
  "$PY" -m spinserve.control.cli bench headline "$OUT/$1"-dense-*.json "$OUT/$1"-spin-*.json \
    --out-prefix "$OUT/headline-$1" 2>&1
}

part_a() {
  setup a
  need_text
  local ctx=${HEADLINE_A_CTX:-8192} out=${HEADLINE_A_OUT:-512} n=${HEADLINE_A_N:-48}
  local hbm=${HEADLINE_A_HBM:-32768} name=${HEADLINE_A_NAME:-a-smollm2-8k}
  local engine=()
  [ -n "${HEADLINE_A_ENGINE:-}" ] && engine=(--engine "$HEADLINE_A_ENGINE")
  local common=("${engine[@]}" --workload longgenbench --max-context "$ctx" --output-len "$out"
    --num-prompts "$n" --prompt-ids "${HEADLINE_A_PROMPT_IDS:-text}" --text-file "$TEXT"
    --kv-cache-tokens "$hbm" --seed 0)
  local dense_env=(SPIN_ENGINE__MAX_CONTEXT="$ctx")
  local spin_env=(SPIN_ENGINE__MAX_CONTEXT="$ctx" SPIN_ENGINE__MAX_RUNNING_REQUESTS="$n"
    SPIN_SPARSE__ALGORITHM=quest SPIN_SPARSE__BUDGET_TOKENS="${HEADLINE_A_BUDGET:-1024}"
    SPIN_CACHE__HIERARCHY=true SPIN_CACHE__HOST_POOL_TOKENS=$((n * ctx))
    SPIN_CACHE__BUFFER_RATIO="${HEADLINE_A_BUFFER:-1}")  # 1x: hit rate 0.96 at 8K on KJV (CPU)
  bench "$name-dense" dense_env "${common[@]}"
  bench "$name-spin" spin_env "${common[@]}"
  headline "$name"
}

# part_b CTX N NAME: the Llama-3.1-8B-shaped random engine at CTX tokens of context
part_b() {
  setup b
  local ctx=$1 n=$2 name=$3 out=${HEADLINE_B_OUT:-1024} hbm=${HEADLINE_B_HBM:-131072}
  local preset=${HEADLINE_B_PRESET:-llama-3.1-8b}
  local engine="$WORK/$preset"
  [ "${HEADLINE_B_PROMPT_IDS:-text-rank}" = random ] || need_text
  rm -rf "$engine"
  "$PY" -m spinserve.control.cli build --random "$preset" --output "$engine" | tail -1
  local common=(--engine "$engine" --workload longgenbench --max-context "$ctx"
    --input-len $((ctx - out)) --output-len "$out" --num-prompts "$n"
    --prompt-ids "${HEADLINE_B_PROMPT_IDS:-text-rank}" --text-file "$TEXT"
    --kv-cache-tokens "$hbm" --seed 0)
  local dense_env=(SPIN_ENGINE__MAX_CONTEXT="$ctx"
    SPIN_ENGINE__MAX_RUNNING_REQUESTS="${HEADLINE_B_DENSE_MAX_RUNNING:-16}")
  local spin_env=(SPIN_ENGINE__MAX_CONTEXT="$ctx" SPIN_ENGINE__MAX_RUNNING_REQUESTS="$n"
    SPIN_SPARSE__ALGORITHM=quest SPIN_SPARSE__BUDGET_TOKENS="${HEADLINE_B_BUDGET:-2048}"
    SPIN_CACHE__HIERARCHY=true SPIN_CACHE__HOST_POOL_TOKENS=$((n * ctx)))
  bench "$name-dense" dense_env "${common[@]}"
  bench "$name-spin" spin_env "${common[@]}"
  headline "$name"
}

case "$PART" in
  a) part_a ;;
  b) part_b "${HEADLINE_B_CTX:-32768}" "${HEADLINE_B_N:-12}" "${HEADLINE_B_NAME:-b-llama8b-32k}" ;;
  b64) part_b "${HEADLINE_B64_CTX:-65536}" "${HEADLINE_B64_N:-6}" \
         "${HEADLINE_B64_NAME:-b-llama8b-64k}" ;;
  all)
    part_a
    part_b "${HEADLINE_B_CTX:-32768}" "${HEADLINE_B_N:-12}" "${HEADLINE_B_NAME:-b-llama8b-32k}"
    part_b "${HEADLINE_B64_CTX:-65536}" "${HEADLINE_B64_N:-6}" \
      "${HEADLINE_B64_NAME:-b-llama8b-64k}"
    "$PY" -m spinserve.control.cli bench headline "$OUT"/*-dense-*.json "$OUT"/*-spin-*.json \
      --out-prefix "$OUT/headline-all" 2>&1 ;;
  *) echo "unknown part $PART: use a, b, b64 or all"; exit 2 ;;
esac
echo "headline $PART: $((SECONDS - T0)) s in all"
