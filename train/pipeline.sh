#!/usr/bin/env bash
# The whole GPU recipe in one command (one GPU, about 9 minutes): bf16 pretraining -> MXFP4 QAT -> perplexity
# evaluation -> MXFP4 export -> DFlash drafter (self-distillation against the exported target) -> z-lab export.
#
#   bash train/pipeline.sh RESULTS_DIR [RUN_DIR]
#
# Needs train/build/tokens/{train,code_heldout,prose_heldout}.u16 (or .u16.xz) from `prepare.py tokenize`
# (`prepare.py bundle DIR` packs scripts + tokens for a remote GPU).  Budgets (seconds of training) come
# from TARGET_S, QAT_S, DRAFT_S (EXTRA_TARGET / EXTRA_QAT / EXTRA_EVAL / EXTRA_DRAFT: more arguments for
# each step, e.g. tiny configs for a CPU smoke test); every step resumes from RUN_DIR/*/state.pt when re-run.  RESULTS_DIR gets
# the log, metrics.json, target.tar and drafter.tar (the exported checkpoint dirs; split into 15 MB parts
# when larger).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
RES="${1:?results dir}"
RUN="${2:-$HERE/runs}"
PY="${PYTHON:-python3}"
TARGET_S="${TARGET_S:-255}"
QAT_S="${QAT_S:-40}"
DRAFT_S="${DRAFT_S:-100}"
ROUNDING="${ROUNDING:-floor}"
export PYTHONUNBUFFERED=1
mkdir -p "$RES" "$RUN"

pack() {  # pack NAME DIR: RES/NAME.tar, split into 15 MB parts if larger
  tar -C "$(dirname "$2")" -cf "$RES/$1.tar" "$(basename "$2")"
  if [ "$(stat -c %s "$RES/$1.tar")" -gt 15000000 ]; then
    split -b 15000000 -d "$RES/$1.tar" "$RES/$1.tar.part"
    rm "$RES/$1.tar"
  fi
}
merge_metrics() {
  "$PY" - "$RUN" "$RES/metrics.json" <<'EOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
out = {}
for name, p in [("target", "target/metrics.json"), ("qat", "qat/metrics.json"), ("perplexity", "eval.json"),
                ("drafter", "drafter/metrics.json")]:
    if (run / p).exists():
        out[name] = json.loads((run / p).read_text())
Path(sys.argv[2]).write_text(json.dumps(out, indent=1) + "\n")
EOF
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, tokenizers, safetensors; print("torch", torch.__version__, "tokenizers", tokenizers.__version__, "safetensors", safetensors.__version__)'

if [ -z "${INIT_HF:-}" ]; then
  echo "== target: bf16 pretraining (${TARGET_S}s)"
  "$PY" "$HERE/train_target.py" --out "$RUN/target" --time-budget "$TARGET_S" ${EXTRA_TARGET:-}
  echo "== target: MXFP4 QAT (${QAT_S}s, scales: $ROUNDING)"
  "$PY" "$HERE/train_target.py" --out "$RUN/qat" --init "$RUN/target/final.pt" --qat "$ROUNDING" \
    --time-budget "$QAT_S" --lr 5e-4 --warmup 10 --min-lr-frac 0.1 --seed 4242 ${EXTRA_QAT:-}
  EVAL_BF16=(--bf16 "$RUN/target/final.pt")
else
  # continue QAT from an exported MXFP4 checkpoint (e.g. the shipped one): no pretraining, no PTQ rows
  echo "== target: more MXFP4 QAT from $INIT_HF (${QAT_S}s, scales: $ROUNDING)"
  "$PY" "$HERE/train_target.py" --out "$RUN/qat" --init-hf "$INIT_HF" --qat "$ROUNDING" \
    --time-budget "$QAT_S" --lr "${QAT_LR:-1e-3}" --warmup 20 --min-lr-frac 0.05 --seed 4343 ${EXTRA_QAT:-}
  EVAL_BF16=()
fi
echo "== export"
"$PY" "$HERE/export.py" --ckpt "$RUN/qat/final.pt" --out "$RUN/export/target"
pack target "$RUN/export/target"
echo "== perplexity"
"$PY" "$HERE/evaluate.py" "${EVAL_BF16[@]}" --qat "$RUN/qat/final.pt" \
  --exported "$RUN/export/target" --out "$RUN/eval.json" ${EXTRA_EVAL:-}
merge_metrics
echo "== drafter (${DRAFT_S}s)"
"$PY" "$HERE/drafter.py" --target "$RUN/export/target" --out "$RUN/drafter" --time-budget "$DRAFT_S" \
  --export "$RUN/export/drafter" ${EXTRA_DRAFT:-}
pack drafter "$RUN/export/drafter"
merge_metrics
ls -la "$RES"
echo "== pipeline done"
