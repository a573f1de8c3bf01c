#!/usr/bin/env python3
"""The greedy speculative loop's acceptance length on the committed eval sets, in PyTorch: an independent
cross-check of `ultra bench-spec`'s τ (same prompts, greedy continuation of the target, block anchored at the
first generated token, accept the leading draft matches + the bonus token, anchor again after them).

    python train/loop_tau.py --target crates/default-model/assets/target --drafter crates/default-model/assets/drafter

Runs on the CPU in a few minutes (f32); the target's greedy continuation is `drafter.greedy_generate`, the
drafter forward the trainer's (`train/check_drafter.py` checks it against the repo's DFlash reference).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import drafter as D  # noqa: E402
from gptoss import load_hf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--eval-dir", default=str(common.HERE / "eval"))
    ap.add_argument("--new-tokens", type=int, default=128, help="generated tokens per prompt (bench-spec: 128)")
    ap.add_argument("--prompts", type=int, default=40, help="prompts per set")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    dev = common.device()
    t = load_hf(Path(args.target), dev).eval()
    d = D.load_zlab(Path(args.drafter), t.c).to(dev).eval()
    emb = t.embed.weight.detach()
    Bk = d.c.block_size
    res = {}
    for name, prompts in D.eval_prompt_sets(Path(args.target), Path(args.eval_dir)).items():
        toks = rounds = 0
        t0 = time.time()
        for p in prompts[: args.prompts]:
            # Bk - 1 tokens past the end, so the last rounds can accept whole blocks, as the engine's can
            s = D.greedy_generate(t, torch.tensor([p], device=dev), len(p) + args.new_tokens + Bk - 1, dev)
            f = D.target_features(t, s, d.c.target_layer_ids, dev)
            n_tok, n_round = D.loop_tau(d, f, s, torch.tensor([len(p)], device=dev), emb, dev)
            toks += n_tok[0]
            rounds += n_round[0]
        res[name] = {"prompts": min(len(prompts), args.prompts), "loop_tau": toks / rounds, "rounds": rounds}
        common.log(f"{name}: loop tau {toks / rounds:.2f} over {rounds} rounds ({time.time() - t0:.0f}s)")
    if args.json:
        common.write_json(Path(args.json), res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
