#!/usr/bin/env bash
# Runs a GPU bundle built by `cargo xtask gpu-bundle` (or `cargo xtask bench`) on a machine with an
# NVIDIA GPU: every GPU test binary (a missing GPU is a failure here: ULTRA_REQUIRE_GPU=1), then
# every benchmark binary. A pass/fail + numbers table is printed last.
#   bash run.sh                 every test binary, then every benchmark
#   bash run.sh --tests-only    tests only
#   bash run.sh --bench-only    benchmarks only
#   ONLY=regex bash run.sh ...  only the test/bench binaries whose name matches regex
# Results: with $OUT set (the device tool), logs and JSON are packed into $OUT/results.tgz and the
# benchmarks' markdown / JSON / SVG are copied to $OUT; otherwise everything stays in ./gpu-results.
set -u
here=$(cd "$(dirname "$0")" && pwd)
tests=1; benches=1
[ "${1:-}" = "--tests-only" ] && benches=0
[ "${1:-}" = "--bench-only" ] && tests=0
if [ -n "${OUT:-}" ]; then out=$(mktemp -d); else out=$here/../gpu-results; fi
mkdir -p "$out"
export ULTRA_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$out/device.txt" 2>&1 || true
summary=()
fail=0
selected() { [ -z "${ONLY:-}" ] || grep -Eq "$ONLY" <<<"$1"; }
if [ $tests = 1 ]; then
  for t in "$here"/tests/*; do
    name=$(basename "$t")
    selected "$name" || continue
    log="$out/test-$name.log"
    "$t" --test-threads=1 >"$log" 2>&1
    rc=$?
    line=$(grep -E '^test result:' "$log" | tail -1)
    passed=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$line")
    failed=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$line")
    if [ $rc -eq 0 ]; then status=PASS; else status=FAIL; fail=1; grep -E '^(test .* FAILED|---- |thread .* panicked)' "$log" | head -20; grep -B2 -A12 -E "panicked at" "$log" | head -60; fi
    summary+=("$(printf '| test  | %-28s | %-4s | %s passed, %s failed |' "$name" "$status" "${passed:-?}" "${failed:-?}")")
  done
fi
if [ $benches = 1 ]; then
  for b in "$here"/bin/*; do
    name=$(basename "$b")
    selected "$name" || continue
    log="$out/bench-$name.log"
    "$b" --json "$out/bench-$name.json" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    if [ $rc -eq 0 ]; then status=PASS; else status=FAIL; fail=1; fi
    summary+=("$(printf '| bench | %-28s | %-4s | see table above and bench-%s.json |' "$name" "$status" "$name")")
  done
fi
echo
cat "$out/device.txt"
echo "| kind  | binary                       | result | detail |"
echo "|-------|------------------------------|--------|--------|"
printf '%s\n' "${summary[@]}"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/results.tgz" -C "$out" .
  for f in "$out"/bench-*.md "$out"/bench-*.svg "$out"/bench-gpu-decode.json; do
    [ -f "$f" ] && cp "$f" "$OUT/"
  done
fi
exit $fail
