#!/usr/bin/env python3
"""Load an exported target in Hugging Face transformers and compare it with the trainer's model (and Ultra).

    python train/check_hf.py --model crates/default-model/assets/target [--ultra target/release/ultra]
        [--golden crates/default-model/tests/golden_hf.json]

* transformers `GptOssForCausalLM.from_pretrained` (float32, eager attention; MXFP4 experts dequantized on
  the CPU with `Mxfp4Config(dequantize=True)`) must load every tensor (no missing / unexpected keys);
* its logits on a few prompts are compared with `gptoss.load_hf` (the trainer's model on the same weights);
* with --ultra, `ultra score --json` log-probabilities are compared with transformers';
* with --golden, writes the goldens of the Rust test (prompt ids, the last position's full logits,
  transformers' greedy continuation of 24 tokens with its top-1 / top-2 logit gaps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gptoss import load_hf  # noqa: E402

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n\nclass Config:\n    def __init__(self, path):\n",
    "Q: Compute 12 + 7 * 3.\nA:",
    "The quick brown fox jumps over the lazy dog. This sentence",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ultra")
    ap.add_argument("--golden")
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args()
    import transformers
    from transformers import AutoTokenizer, GptOssForCausalLM, Mxfp4Config

    transformers.logging.set_verbosity_error()
    d = Path(args.model)
    cfg = json.loads((d / "config.json").read_text())
    kw = {}
    if cfg.get("quantization_config", {}).get("quant_method") == "mxfp4":
        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    hf, info = GptOssForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                                 output_loading_info=True, **kw)
    hf.eval()
    bad = {k: v for k, v in info.items() if v}
    print("transformers", transformers.__version__, "loading info:", bad or "all tensors matched")
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        raise SystemExit("transformers did not load every tensor")
    tok = AutoTokenizer.from_pretrained(d)
    mine = load_hf(d).eval()
    report = {"transformers": transformers.__version__, "prompts": []}
    goldens = []
    for p in PROMPTS:
        ids = tok(p)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            lh = hf(x).logits[0]
            lm = mine(x)["logits"][0]
            # explicit all-ones mask: the prompt starts with <|endoftext|> = pad id 0, which generate() would
            # otherwise take for padding
            gen = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=args.new_tokens,
                              do_sample=False, output_scores=True,
                              return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
        new = gen.sequences[0, len(ids):].tolist()
        gaps = []
        for s in gen.scores:
            top2 = s[0].float().topk(2).values
            gaps.append(float(top2[0] - top2[1]))
        d_mine = float((lh - lm).abs().max())
        row = {"prompt": p, "tokens": len(ids), "max_abs_dlogit_trainer_vs_hf": d_mine,
               "hf_greedy": tok.decode(new), "min_top2_gap": min(gaps)}
        if args.ultra:
            out = subprocess.run([args.ultra, "score", "--model", str(d), "--token-ids", ",".join(map(str, ids)),
                                  "--json"], capture_output=True, text=True, check=True).stdout
            lp_u = json.loads(out)["logprobs"]
            lp_h = torch.log_softmax(lh, -1)
            diffs = [abs(lp_u[i] - float(lp_h[i - 1, ids[i]])) for i in range(1, len(ids))]
            row["max_abs_dlogprob_ultra_vs_hf"] = max(diffs) if diffs else 0.0
        report["prompts"].append(row)
        goldens.append({"prompt": p, "input_ids": ids,
                        "last_logits": [round(float(v), 5) for v in lh[-1]],
                        "greedy_continuation": new, "greedy_top2_gaps": [round(g, 5) for g in gaps]})
        print(json.dumps(row))
    worst = max(r["max_abs_dlogit_trainer_vs_hf"] for r in report["prompts"])
    print(f"max |logit(trainer) - logit(transformers)| = {worst:.2e}")
    if args.golden:
        g = {"generator": {"transformers": transformers.__version__, "torch": torch.__version__,
                           "script": "train/check_hf.py", "dtype": "float32", "attn_implementation": "eager"},
             "model": str(d), "prompts": goldens}
        Path(args.golden).write_text(json.dumps(g, separators=(",", ":")) + "\n")
        print("wrote", args.golden)
    return 0


if __name__ == "__main__":
    sys.exit(main())
