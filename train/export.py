#!/usr/bin/env python3
"""Export a trained target (final.pt) as a Hugging Face gpt-oss checkpoint directory.

    python train/export.py --ckpt runs/qat/final.pt --out runs/export/target            # MXFP4 experts (shipped)
    python train/export.py --ckpt runs/qat/final.pt --out runs/export/target-bf16 --bf16  # dense bf16 experts

MXFP4: experts as `*_blocks` U8 [E, out, in/32, 16] + `*_scales` U8 [E, out, in/32] (the released gpt-oss
layout, `quantization_config.quant_method: mxfp4`), quantized from bf16(weights) with the scale rule the QAT
used (`final.pt`'s `qat`, or --rounding).  Everything else bf16.  The tokenizer files are copied from
train/tokenizer/.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, log  # noqa: E402
from gptoss import Config, GptOss, save_hf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bf16", action="store_true", help="dense bf16 experts instead of MXFP4")
    ap.add_argument("--rounding", choices=["floor", "up"], help="MXFP4 scale rule (default: the QAT's, else floor)")
    ap.add_argument("--tokenizer", default=str(HERE / "tokenizer"))
    args = ap.parse_args()
    ck = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    m = GptOss(Config(**ck["config"]))
    m.load_state_dict(ck["model"])
    rounding = None if args.bf16 else (args.rounding or ck.get("qat") or "floor")
    save_hf(m, Path(args.out), rounding, Path(args.tokenizer))
    size = sum(p.stat().st_size for p in Path(args.out).iterdir())
    log(f"wrote {args.out} ({'bf16' if rounding is None else 'MXFP4 ' + rounding} experts, {size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
