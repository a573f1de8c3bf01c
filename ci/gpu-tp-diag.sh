#!/usr/bin/env bash
# The tensor-/expert-parallel GPU tests of a bundle (`cargo xtask gpu-bundle`) run one test per
# process, all at once, each under a timeout, printing each test's time and result, the per-split
# timings the tests print (`checked in`, the device drafter's rounds) and, for any test still
# running after 45 s and 80 s, where its threads wait (gdb if present, else /proc wchan). Then
# gpu-comm (new, and BASE_COMM=path: an older gpu-comm, alternating, same GPU) and gpu-tp
# --ranks 1,2 on a quiet GPU first. Meant for the device tool: carry ["gpu-bundle"], command
# `bash ci/gpu-tp-diag.sh`; logs go to $OUT/tp-diag.tgz (or ./gpu-results).
#   TT=seconds     per-test timeout (default 150)
#   PAR=0          one test after another (clean per-test times; a hang then holds for TT)
#   BASE_COMM=f    a gpu-comm binary to compare the one-shot all-reduce latency with
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
o=${OUT:-$root/gpu-results}; d=$(mktemp -d); L=$d/logs; mkdir -p $L $o
bash "$root/gpu-bundle/run.sh" --extract $d/x >/dev/null || { echo "no bundle: cargo xtask gpu-bundle"; exit 2; }
x=$d/x
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
export ULTRA_REQUIRE_GPU=1 NCCL_NVLS_ENABLE=0 ULTRA_FIXTURES=$root/fixtures ULTRA_CACHE_DIR=$d/cache RUST_BACKTRACE=1
G=$(command -v gdb || true)
T0=$(date +%s)
# ---- benches on a quiet GPU
i=0
for v in ${BASE_COMM:+base} new ${BASE_COMM:+base} new; do
  i=$((i+1)); b=$x/bin/gpu-comm; [ $v = base ] && b=$BASE_COMM
  timeout 60 $b --samples 7 --json $L/comm-$v-$i.json > $L/comm-$v-$i.log 2>&1; echo "gpu-comm $v rc=$?"
done
python3 - $L <<'PY'
import json, glob, sys, statistics as st
R = {}
for f in sorted(glob.glob(sys.argv[1] + '/comm-*.json')):
    v = f.split('comm-')[1].split('-')[0]
    try:
        rows = json.load(open(f))['rows']
    except Exception as e:
        print('unreadable', f, e)
        continue
    for r in rows:
        R.setdefault((r['case'], r['ranks'], r['bytes']), {}).setdefault(v, []).append((r['eager_us'], r['graph_us']))
print('case ranks bytes | eager µs base/new | graph µs base/new (median of the runs)')
for k, x in sorted(R.items()):
    f = lambda v, i: '%.2f' % st.median([a[i] for a in x[v]]) if v in x else '-'
    print(k[0][:16], k[1], k[2], '|', f('base', 0), '/', f('new', 0), '|', f('base', 1), '/', f('new', 1))
PY
s=$SECONDS; timeout 90 $x/bin/gpu-tp --ranks 1,2 --repeats 3 > $L/gpu-tp.log 2>&1; echo "gpu-tp --ranks 1,2 rc=$? $((SECONDS-s))s"
grep -E "^\| [a-zA-Z]" $L/gpu-tp.log | cut -c1-120
# ---- tests, one process each
declare -A P
run() { # name binary args...
  local n=$1; shift
  ( s=$(date +%s); timeout ${TT:-150} "$@" --test-threads=1 --nocapture > $L/t-$n.log 2>&1
    echo "rc=$? $(( $(date +%s)-s ))s" > $L/t-$n.rc ) &
  P[$n]=$!
  [ "${PAR:-1}" = 0 ] && wait ${P[$n]}
}
for t in $($x/tests/tp --list 2>/dev/null | sed -n 's/: test$//p'); do run tp-$t $x/tests/tp --exact $t; done
for t in $($x/tests/gpu_tp --list 2>/dev/null | sed -n 's/: test$//p'); do run gtp-$t $x/tests/gpu_tp --exact $t; done
# The device-drafter test again with CUDA's lazy kernel loading (the tests load eagerly unless
# CUDA_MODULE_LOADING is set): does eager loading matter?
CUDA_MODULE_LOADING=LAZY run lazy-device-drafter $x/tests/gpu_tp --exact device_drafter_speculative_greedy_equals_plain_greedy_under_tp
CUDA_MODULE_LOADING=LAZY run lazy-toy-ep $x/tests/tp --exact toy_models_match_cpu_expert_parallel
[ -x $x/tests/gpu_serve_tp ] && run serve-tp $x/tests/gpu_serve_tp
run moe $x/tests/moe
run exec $x/tests/exec
run allreduce $x/tests/gpu_allreduce
dump() {
  for n in "${!P[@]}"; do
    [ -e $L/t-$n.rc ] && continue
    tq=$(pgrep -P ${P[$n]} -x timeout | head -1); tp=""; [ -n "$tq" ] && tp=$(pgrep -P $tq | head -1)
    echo "== $1 s, still running: $n (pid ${tp:-?}): $(grep -vE '^\s*$' $L/t-$n.log | tail -1 | cut -c1-150)"
    [ -z "$tp" ] && continue
    if [ -n "$G" ]; then
      timeout 20 gdb -p $tp -batch -ex 'thread apply all bt 16' > $L/bt-$n-$1.txt 2>&1
      grep -E "^#" $L/bt-$n-$1.txt | grep -E "cu[A-Z][a-zA-Z]+|tilert|dflash|comm::" | head -6 | cut -c1-160
    else
      for t in /proc/$tp/task/*; do echo "$(cat $t/comm):$(cat $t/wchan)"; done | sort | uniq -c | head -6 | tr '\n' ' '; echo
    fi
  done
}
sleep 45; dump 45
sleep 35; dump 80
wait
echo "all done after $(( $(date +%s)-T0 ))s"
for n in $(ls $L | sed -n 's/^t-\(.*\)\.rc$/\1/p' | sort); do
  echo "$n: $(cat $L/t-$n.rc) $(grep -E '^test result' $L/t-$n.log | tail -1 | cut -c1-70)"
  grep -qE '^test result: ok' $L/t-$n.log || { grep -E "panicked|Timeout|SKIPPED|FAILED" $L/t-$n.log | head -4 | cut -c1-300; grep -vE '^\s*$' $L/t-$n.log | tail -2 | cut -c1-200; }
done
python3 - $L <<'PY'
import glob, re, sys
for f in sorted(glob.glob(sys.argv[1] + '/t-*.log')):
    t = open(f, errors='replace').read()
    n = f.split('/t-')[1][:-4]
    ck = [float(m) for m in re.findall(r'checked in ([0-9.]+)s\b', t)]
    ck += [float(m) / 1e3 for m in re.findall(r'checked in ([0-9.]+)ms', t)]
    er = re.findall(r'logits max \|Δ\| vs CPU TP ([0-9.e+-]+) \(max \|logit\| ([0-9.]+)\)', t)
    rel = max([float(a) / (1 + float(b)) for a, b in er], default=0)
    taus = re.findall(r'B=(\d+)[^:\n]*: tau ([0-9.]+)', t)
    if ck or er or taus:
        print(n, 'splits %d, slowest %.2f s, sum %.1f s;' % (len(ck), max(ck, default=0), sum(ck)),
              'max |Δ|/(1+max|logit|) %.2e;' % rel, 'tau', ' '.join(b + ':' + x for b, x in taus)[:150])
PY
tar czf $o/tp-diag.tgz -C $L . 2>/dev/null && echo "logs: $o/tp-diag.tgz"
