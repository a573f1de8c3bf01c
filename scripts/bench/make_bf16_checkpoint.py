#!/usr/bin/env python3
"""Writes a random-weight bf16 Qwen3-MoE checkpoint of a chosen size (standard library only),
for load-time / host-memory measurements of `ultra score` / `ultra generate` (BENCHMARKS.md).

    python3 scripts/bench/make_bf16_checkpoint.py OUT_DIR [--layers 10] [--hidden 1024]
        [--experts 32] [--moe-intermediate 512] [--vocab 32000]

The defaults give ~1.19 GB of bf16 weights. Values are small (|w| < 0.05), deterministic; the
tokenizer files are copied from the qwen3-moe fixture (its ids are < the vocabulary).
"""

import argparse
import json
import os
import random
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "..", "fixtures", "qwen3-moe", "native")


def bf16_pool(n, seed):
    """n bf16 values (bytes), uniform in ±0.05, rounded by truncation."""
    r = random.Random(seed)
    f = struct.pack(f"<{n}f", *(r.uniform(-0.05, 0.05) for _ in range(n)))
    # keep the high half of each f32
    return b"".join(f[i + 2 : i + 4] for i in range(0, len(f), 4))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--moe-intermediate", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    h, heads, kv, hd = a.hidden, a.hidden // 64, max(1, a.hidden // 256), 64
    i_m, e, v = a.moe_intermediate, a.experts, a.vocab

    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for l in range(a.layers):
        p = f"model.layers.{l}"
        shapes[f"{p}.input_layernorm.weight"] = [h]
        shapes[f"{p}.post_attention_layernorm.weight"] = [h]
        shapes[f"{p}.self_attn.q_proj.weight"] = [heads * hd, h]
        shapes[f"{p}.self_attn.k_proj.weight"] = [kv * hd, h]
        shapes[f"{p}.self_attn.v_proj.weight"] = [kv * hd, h]
        shapes[f"{p}.self_attn.o_proj.weight"] = [h, heads * hd]
        shapes[f"{p}.self_attn.q_norm.weight"] = [hd]
        shapes[f"{p}.self_attn.k_norm.weight"] = [hd]
        shapes[f"{p}.mlp.gate.weight"] = [e, h]
        for x in range(e):
            shapes[f"{p}.mlp.experts.{x}.gate_proj.weight"] = [i_m, h]
            shapes[f"{p}.mlp.experts.{x}.up_proj.weight"] = [i_m, h]
            shapes[f"{p}.mlp.experts.{x}.down_proj.weight"] = [h, i_m]
    names = sorted(shapes)
    header, off = {}, 0
    for n in names:
        size = 2
        for d in shapes[n]:
            size *= d
        header[n] = {"dtype": "BF16", "shape": shapes[n], "data_offsets": [off, off + size]}
        off += size
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * (-len(hj) % 8)
    os.makedirs(a.out, exist_ok=True)
    pool = bf16_pool(1 << 20, 1)  # 2 MiB of values, reused at shifting offsets
    one_bf16 = struct.pack("<f", 1.0)[2:4]
    with open(os.path.join(a.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for k, n in enumerate(names):
            size = header[n]["data_offsets"][1] - header[n]["data_offsets"][0]
            if n.endswith("norm.weight"):
                f.write(one_bf16 * (size // 2))
                continue
            start = (k * 4099 * 2) % len(pool)
            left = size
            while left > 0:
                chunk = pool[start : start + left]
                f.write(chunk)
                left -= len(chunk)
                start = 0
    cfg = json.load(open(os.path.join(FIXTURE, "config.json")))
    cfg.update(
        hidden_size=h,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hd,
        num_hidden_layers=a.layers,
        num_local_experts=e,
        num_experts=e,
        num_experts_per_tok=2,
        moe_intermediate_size=i_m,
        intermediate_size=4 * h,
        vocab_size=v,
        tie_word_embeddings=False,
    )
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    for fn in ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(FIXTURE, fn), os.path.join(a.out, fn))
    total = 8 + len(hj) + off
    print(f"wrote {a.out}: {len(names)} tensors, {total / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
