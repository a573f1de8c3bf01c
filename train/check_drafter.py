#!/usr/bin/env python3
"""Check that the drafter trainer's batched block forward equals the repo's DFlash reference (the oracle the
Rust drafter is tested against, scripts/fixtures/dflash_reference.py) on an exported drafter.

    python train/check_drafter.py --target DIR --drafter DIR

For a few anchors a of a greedy continuation: the reference appends the target features of positions
0..a-1 as context and drafts the block [token_a, MASK x (B-1)] at position a; the trainer computes the same
blocks in one batched pass.  Prints the largest |logit difference| (float32) and asserts it is small.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts" / "fixtures"))
import dflash_reference as ref  # noqa: E402
from drafter import DraftConfig, Drafter, greedy_generate, target_features  # noqa: E402
from gptoss import load_hf  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", required=True)
    ap.add_argument("--drafter", required=True)
    ap.add_argument("--tol", type=float, default=2e-3)
    args = ap.parse_args()
    dev = torch.device("cpu")
    t = load_hf(Path(args.target)).eval()
    rd = ref.DFlashDrafter(Path(args.drafter), dtype=torch.float32)
    s = rd.spec
    import json
    raw = json.loads((Path(args.drafter) / "config.json").read_text())
    dc = raw["dflash_config"]
    c = DraftConfig(hidden_size=s.hidden_size, num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                    num_key_value_heads=s.num_kv_heads, head_dim=s.head_dim, intermediate_size=s.intermediate_size,
                    sliding_window=s.layers[0].sliding_window, rope_theta=s.rope_theta, rms_norm_eps=s.rms_norm_eps,
                    block_size=s.block_size, mask_token_id=s.mask_token_id, target_layer_ids=s.target_layer_ids,
                    num_target_layers=raw["num_target_layers"], vocab_size=raw["vocab_size"],
                    num_anchors=dc.get("num_anchors", 64), loss_decay_gamma=dc.get("loss_decay_gamma", 4.0))
    assert all(la.causal and la.sliding_window == c.sliding_window for la in s.layers), s.layers
    d = Drafter(c)
    from safetensors.torch import load_file
    w = load_file(str(Path(args.drafter) / "model.safetensors"))
    sd = {}
    for k, v in w.items():
        k2 = k.replace("self_attn.", "").replace("mlp.", "")
        k2 = k2.replace("input_layernorm.weight", "input_layernorm").replace("post_attention_layernorm.weight",
                                                                             "post_attention_layernorm")
        k2 = k2.replace("q_norm.weight", "q_norm").replace("k_norm.weight", "k_norm")
        k2 = {"hidden_norm.weight": "hidden_norm", "norm.weight": "norm"}.get(k2, k2)
        sd[k2] = v.float()
    d.load_state_dict(sd)
    d.eval()
    prompt = torch.tensor([[0] + list(range(100, 140))])
    seq = greedy_generate(t, prompt, 200, dev)
    feats = target_features(t, seq, c.target_layer_ids, dev).float()
    # the reference feeds float32 features; give the trainer the same (bf16-rounded) values
    anchors = torch.tensor([[41, 60, 97, 150, 192]])
    with torch.no_grad():
        hs = d(feats, seq, anchors, t.embed.weight)
        mine = torch.nn.functional.linear(hs[0, :, 1:], t.embed.weight)  # [A, B-1, V]
    worst = 0.0
    for j, a in enumerate(anchors[0].tolist()):
        rd.reset()
        rd.append_context(feats[0, :a], torch.arange(0, a))
        lg = rd.draft_logits(int(seq[0, a]), a, t.embed.weight, t.embed.weight)
        worst = max(worst, float((lg - mine[j]).abs().max()))
    print(f"max |draft logit (trainer) - draft logit (dflash_reference)| over {anchors.shape[1]} blocks: {worst:.2e}")
    assert worst < args.tol, worst
    return 0


if __name__ == "__main__":
    sys.exit(main())
