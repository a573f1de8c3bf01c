#!/usr/bin/env bash
# Runs a GPU bundle built by `cargo xtask gpu-bundle` on a machine with an NVIDIA GPU:
# every GPU test binary (a missing GPU is a failure here: ULTRA_REQUIRE_GPU=1), then every
# benchmark binary. Full logs and JSON results go to $OUT (or ./gpu-results); a pass/fail + numbers
# table is printed last.
#   bash run.sh                 every test binary, then every benchmark
#   bash run.sh --tests-only    tests only
#   ONLY=regex bash run.sh ...  only the test binaries whose name matches regex
set -u
tests_only=0
[ "${1:-}" = "--tests-only" ] && tests_only=1
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-$here/../gpu-results}
mkdir -p "$out"
export ULTRA_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$out/device.txt" 2>&1 || true
summary=()
fail=0
for t in "$here"/tests/*; do
  name=$(basename "$t")
  if [ -n "${ONLY:-}" ] && ! grep -Eq "$ONLY" <<<"$name"; then continue; fi
  log="$out/test-$name.log"
  "$t" --test-threads=1 >"$log" 2>&1
  rc=$?
  line=$(grep -E '^test result:' "$log" | tail -1)
  passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$line")
  failed=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$line")
  if [ $rc -eq 0 ]; then status=PASS; else status=FAIL; fail=1; grep -E '^(test .* FAILED|---- |thread .* panicked)' "$log" | head -20; fi
  summary+=("$(printf '| test  | %-28s | %-4s | %s passed, %s failed |' "$name" "$status" "${passed:-?}" "${failed:-?}")")
done
for b in "$here"/bin/*; do
  [ $tests_only = 1 ] && break
  name=$(basename "$b")
  log="$out/bench-$name.log"
  "$b" --json "$out/bench-$name.json" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  if [ $rc -eq 0 ]; then status=PASS; else status=FAIL; fail=1; fi
  summary+=("$(printf '| bench | %-28s | %-4s | see table above and bench-%s.json |' "$name" "$status" "$name")")
done
echo
cat "$out/device.txt"
echo "| kind  | binary                       | result | detail |"
echo "|-------|------------------------------|--------|--------|"
printf '%s\n' "${summary[@]}"
exit $fail
