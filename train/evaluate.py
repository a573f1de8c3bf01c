#!/usr/bin/env python3
"""Held-out perplexity of the target: bf16, MXFP4 post-training quantization, MXFP4 QAT, and the export.

    python train/evaluate.py --bf16 runs/target/final.pt --qat runs/qat/final.pt \
        [--exported runs/export/target] --out runs/eval.json

Sets: the held-out code files (build/tokens/code_heldout.u16: windows of 1024 tokens, each scored from a
fresh context), the held-out documentation files (prose_heldout.u16), and the committed eval sets
(train/eval/{code,math,prose}.jsonl: NLL of each reference continuation given its prompt).
Variants: `bf16` = the pretrained weights as trained (bf16 compute); `ptq_floor` / `ptq_up` = its experts
rounded to MXFP4 (OCP floor scales / never-clipping scales) with no further training; `qat` = after
quantization-aware training (experts at their MXFP4 values: the shipped model); `exported` = the MXFP4
checkpoint read back from disk (must equal `qat`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import log  # noqa: E402
from gptoss import Config, GptOss, load_hf  # noqa: E402


def load_ck(p: str, dev) -> tuple[GptOss, str | None]:
    ck = torch.load(p, map_location="cpu", weights_only=False)
    m = GptOss(Config(**ck["config"]))
    m.load_state_dict(ck["model"])
    return m.to(dev), ck.get("qat")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16")
    ap.add_argument("--qat")
    ap.add_argument("--exported")
    ap.add_argument("--tokens", default=str(common.HERE / "build/tokens"))
    ap.add_argument("--eval-dir", default=str(common.HERE / "eval"))
    ap.add_argument("--tokenizer", default=str(common.HERE / "tokenizer/tokenizer.json"))
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=500_000)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from tokenizers import Tokenizer

    dev = common.device()
    tok = Tokenizer.from_file(args.tokenizer)
    sets = {n: common.load_tokens(Path(args.tokens) / f"{n}.u16") for n in ("code_heldout", "prose_heldout")}
    items = {n: common.read_jsonl(Path(args.eval_dir) / f"{n}.jsonl") for n in ("code", "math", "prose")}

    def run(name, m):
        m.eval()
        r = {}
        for n, toks in sets.items():
            r[n] = common.perplexity(m, toks, args.seq, dev, args.max_tokens)["ppl"]
        for n, it in items.items():
            r[f"evalset_{n}"] = common.eval_set_perplexity(m, tok, it, dev)["ppl"]
        log(name, json.dumps({k: round(v, 3) for k, v in r.items()}))
        return r

    res = {}
    if args.bf16:
        m, _ = load_ck(args.bf16, dev)
        res["bf16"] = run("bf16", m)
        for rule in ("floor", "up"):
            m, _ = load_ck(args.bf16, dev)
            m.quantize_experts_(rule)
            res[f"ptq_{rule}"] = run(f"ptq_{rule}", m)
    if args.qat:
        m, rule = load_ck(args.qat, dev)
        m.quantize_experts_(rule or "floor")
        res["qat"] = run(f"qat ({rule})", m)
    if args.exported:
        res["exported"] = run("exported", load_hf(Path(args.exported), dev))
    common.write_json(Path(args.out), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
