#!/usr/bin/env bash
# Runs a GPU bundle built by `cargo xtask gpu-bundle` (or `cargo xtask bench`) on a machine with an
# NVIDIA GPU: every GPU test binary (a missing GPU is a failure here: ULTRA_REQUIRE_GPU=1), a smoke
# run of `ultra generate --device cuda` on the embedded default model, then every benchmark
# program. A pass/fail + numbers table is printed last.
#   bash run.sh                 tests, the ultra smoke run, then every benchmark
#   bash run.sh --tests-only    tests and the smoke run only
#   bash run.sh --bench-only    benchmarks only
#   bash run.sh --extract DIR   only unpack the programs into DIR (assets restored) and exit
#   ONLY=regex bash run.sh ...  only the test/bench binaries whose name matches regex
# The bundle is bundle.tar.xz beside this script, unpacked into a temporary folder; `ultra` comes
# without the default model's weights it embeds, copied back from the checkout. Fixtures come
# from the bundle (--self-contained) or from the checkout it sits in (gpu-bundle/../fixtures), as
# when the device tool carries it: `carry ["gpu-bundle"]`, command `bash gpu-bundle/run.sh`.
# Results: with $OUT set (the device tool), logs and JSON are packed into $OUT/results.tgz and the
# benchmarks' markdown / JSON / SVG are copied to $OUT; otherwise everything stays in ./gpu-results.
set -u
here=$(cd "$(dirname "$0")" && pwd)
tests=1; benches=1
[ "${1:-}" = "--tests-only" ] && benches=0
[ "${1:-}" = "--bench-only" ] && tests=0
keep=""
[ "${1:-}" = "--extract" ] && { keep=${2:?--extract needs a folder}; mkdir -p "$keep" || exit 2; }
if [ -d "$here/fixtures" ]; then data=$here
elif [ -d "$here/../fixtures" ]; then data=$(cd "$here/.." && pwd)
else echo "no fixtures: neither $here/fixtures (a --self-contained bundle) nor $here/../fixtures (a checkout)" >&2; exit 2
fi
if [ -n "$keep" ]; then work=$(cd "$keep" && pwd); else work=$(mktemp -d); trap 'rm -rf "$work"' EXIT; fi
# The checkout may travel without its PTX (the device tool's carry limit): ptx.tar.xz has them.
if [ -f "$here/ptx.tar.xz" ] && ! ls "$data"/kernels/artifacts/*.ptx >/dev/null 2>&1; then
  tar -xJf "$here/ptx.tar.xz" -C "$data" || exit 2
fi
if command -v xz >/dev/null; then
  tar -xJf "$here/bundle.tar.xz" -C "$work" || exit 2
else
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
    "$here/bundle.tar.xz" "$work" || exit 2
fi
# Binaries ship with the files they embed (the default model's assets, the kernel images) zeroed
# (holes.txt): copy them back from $data and check each binary against its original's SHA-256.
declare -A want=()
while read -r kind a b c d; do
  case $kind in
    sha256) want[$b]=$a ;;
    hole) dd if="$data/$d" of="$work/$a" bs=1M seek="$b" oflag=seek_bytes conv=notrunc status=none || true ;;
  esac
done < <(cat "$work/holes.txt" 2>/dev/null)
restored=0
for bin in "${!want[@]}"; do
  if [ "$(sha256sum "$work/$bin" | cut -d' ' -f1)" = "${want[$bin]}" ]; then restored=$((restored + 1))
  else
    echo "$bin: the files it embeds (default-model assets, kernels/artifacts) in $data differ from the ones it was built with; not run" >&2
    rm -f "$work/$bin"
  fi
done
[ -n "$keep" ] && { echo "unpacked into $work ($restored binaries restored from $data)"; exit 0; }
if [ -n "${OUT:-}" ]; then out=$(mktemp -d); else out=$data/gpu-results; fi
mkdir -p "$out"
# Tests and benchmarks read fixtures/ (and ../crates/default-model/assets) from here.
cd "$data"
export ULTRA_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 ULTRA_FIXTURES=$data/fixtures
export ULTRA_CACHE_DIR=${ULTRA_CACHE_DIR:-$work/cache}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv >"$out/device.txt" 2>&1 || true
summary=()
fail=0
selected() { [ -z "${ONLY:-}" ] || grep -Eq "$ONLY" <<<"$1"; }
if [ $tests = 1 ]; then
  for t in "$work"/tests/*; do
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
  if selected ultra; then
    [ -x "$work/ultra" ] || { summary+=("$(printf '| run   | %-28s | FAIL | not restored (see above) |' "ultra generate --device cuda")"); fail=1; }
  fi
  if [ -x "$work/ultra" ] && selected ultra; then
    log="$out/ultra-generate.log"
    "$work/ultra" generate --device cuda --max-tokens 64 "def fibonacci(n):" >"$log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then status=PASS; else status=FAIL; fail=1; tail -20 "$log"; fi
    summary+=("$(printf '| run   | %-28s | %-4s | %s |' "ultra generate --device cuda" "$status" "$(grep -E 'tok/s' "$log" | tail -1 | cut -c1-60)")")
  fi
fi
if [ $benches = 1 ]; then
  for b in "$work"/bin/*; do
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
