#!/usr/bin/env bash
# The GPU test suite (`pytest -m gpu`) on the device machine, one pytest process per test file
# (a CUDA fault in one file cannot hide the others). Carry `.whl` (pydantic & co, see
# ../shared/device/README.md); tests that need the embedded SmolLM2 find it only when .stage
# was carried too (setup-remote.sh), the rest build tiny checkpoints with transformers.
# Usage: bash perf/gpu_tests.sh [test files...]   (logs under $OUT)
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
files=("$@")
[ ${#files[@]} -eq 0 ] && mapfile -t files < <(grep -rl "mark.gpu\|pytestmark = pytest.mark.gpu" tests --include='test_*.py' | sort)
status=0
for f in "${files[@]}"; do
  log=/tmp/pytest_one.log
  timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE "$f" >"$log" 2>&1
  rc=$?
  { echo "=== $f rc=$rc"; cat "$log"; } >>"$OUT/pytest_gpu.log"
  [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1 && grep -E "^(FAILED|ERROR)|Error|error:" "$log" | head -8
  printf '%-55s rc=%-3s %s\n' "$f" "$rc" "$(grep -E 'passed|failed|error' "$log" | tail -1)"
done
exit $status
