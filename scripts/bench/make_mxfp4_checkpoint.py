#!/usr/bin/env python3
"""Writes a random-weight gpt-oss checkpoint in the Hub's MXFP4 layout (standard library only), by
default of gpt-oss-20b's size (fixtures/configs/gpt-oss-20b.json: 24 layers, hidden 2880, 32 experts
of 2880, vocabulary 201088; about 13.8 GB), for load-time / host-memory measurements of
`ultra generate --device cuda` (BENCHMARKS.md, issue #15).

    python3 scripts/bench/make_mxfp4_checkpoint.py OUT_DIR [--layers 24] [--shards 3]

Experts are `*_blocks` (U8, two E2M1 nibbles per byte) + `*_scales` (U8 E8M0, 2^-6..2^-3 so that
products stay small); everything else BF16 (|w| < 0.05, norms 1). Values repeat from a 2 MiB pool
at shifting offsets (the measurement is about bytes, not outputs). The tokenizer files come from
the small gpt-oss fixture (its ids are < the vocabulary). With `--shards N` the tensors are spread
over N files plus `model.safetensors.index.json`, as on the Hub.
"""

import argparse
import json
import os
import random
import shutil
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
CONFIG = os.path.join(ROOT, "fixtures", "configs", "gpt-oss-20b.json")
TOKENIZER = os.path.join(ROOT, "fixtures", "gpt-oss", "mxfp4")


def bf16_pool(n, seed):
    """n bf16 values (bytes), uniform in ±0.05, rounded by truncation."""
    r = random.Random(seed)
    f = struct.pack(f"<{n}f", *(r.uniform(-0.05, 0.05) for _ in range(n)))
    return b"".join(f[i + 2 : i + 4] for i in range(0, len(f), 4))


def byte_pool(n, seed, lo, hi):
    r = random.Random(seed)
    return bytes(r.randint(lo, hi) for _ in range(n))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=None, help="default: the config's 24")
    ap.add_argument("--shards", type=int, default=3)
    a = ap.parse_args()
    cfg = json.load(open(CONFIG))
    if a.layers is not None:
        cfg["num_hidden_layers"] = a.layers
        cfg["layer_types"] = cfg["layer_types"][: a.layers]
    nl, h, v = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]
    heads, kv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    e, i_m = cfg["num_local_experts"], cfg["intermediate_size"]

    shapes = {}  # name -> (dtype, shape)
    shapes["model.embed_tokens.weight"] = ("BF16", [v, h])
    shapes["lm_head.weight"] = ("BF16", [v, h])
    shapes["model.norm.weight"] = ("BF16", [h])
    for l in range(nl):
        p = f"model.layers.{l}"
        shapes[f"{p}.input_layernorm.weight"] = ("BF16", [h])
        shapes[f"{p}.post_attention_layernorm.weight"] = ("BF16", [h])
        for n, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            shapes[f"{p}.self_attn.{n}_proj.weight"] = ("BF16", [rows, h])
            shapes[f"{p}.self_attn.{n}_proj.bias"] = ("BF16", [rows])
        shapes[f"{p}.self_attn.o_proj.weight"] = ("BF16", [h, heads * hd])
        shapes[f"{p}.self_attn.o_proj.bias"] = ("BF16", [h])
        shapes[f"{p}.self_attn.sinks"] = ("BF16", [heads])
        shapes[f"{p}.mlp.router.weight"] = ("BF16", [e, h])
        shapes[f"{p}.mlp.router.bias"] = ("BF16", [e])
        x = f"{p}.mlp.experts"
        shapes[f"{x}.gate_up_proj_blocks"] = ("U8", [e, 2 * i_m, h // 32, 16])
        shapes[f"{x}.gate_up_proj_scales"] = ("U8", [e, 2 * i_m, h // 32])
        shapes[f"{x}.gate_up_proj_bias"] = ("BF16", [e, 2 * i_m])
        shapes[f"{x}.down_proj_blocks"] = ("U8", [e, h, i_m // 32, 16])
        shapes[f"{x}.down_proj_scales"] = ("U8", [e, h, i_m // 32])
        shapes[f"{x}.down_proj_bias"] = ("BF16", [e, h])

    names = list(shapes)
    size_of = {}
    for n in names:
        dt, shape = shapes[n]
        s = 2 if dt == "BF16" else 1
        for d in shape:
            s *= d
        size_of[n] = s
    total = sum(size_of.values())
    # Contiguous groups of tensors, one per shard, of about equal bytes.
    shard_of, acc = {}, 0
    for n in names:
        shard_of[n] = min(a.shards - 1, acc * a.shards // total)
        acc += size_of[n]
    files = [
        f"model-{k + 1:05d}-of-{a.shards:05d}.safetensors" if a.shards > 1 else "model.safetensors"
        for k in range(a.shards)
    ]

    os.makedirs(a.out, exist_ok=True)
    pools = {
        "bf16": bf16_pool(1 << 20, 1),
        "blocks": byte_pool(1 << 21, 2, 0, 255),
        "scales": byte_pool(1 << 16, 3, 121, 124),
    }
    one_bf16 = struct.pack("<f", 1.0)[2:4]
    written = 0
    for k, fname in enumerate(files):
        mine = [n for n in names if shard_of[n] == k]
        header, off = {}, 0
        for n in mine:
            dt, shape = shapes[n]
            header[n] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + size_of[n]]}
            off += size_of[n]
        header["__metadata__"] = {"format": "pt"}
        hj = json.dumps(header, separators=(",", ":")).encode()
        hj += b" " * (-len(hj) % 8)
        with open(os.path.join(a.out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(hj)))
            f.write(hj)
            for j, n in enumerate(mine):
                size = size_of[n]
                if n.endswith("norm.weight"):
                    f.write(one_bf16 * (size // 2))
                    continue
                pool = pools[
                    "blocks" if n.endswith("_blocks") else "scales" if n.endswith("_scales") else "bf16"
                ]
                start = (j * 4099 * 2) % len(pool)
                left = size
                while left > 0:
                    chunk = pool[start : start + left]
                    f.write(chunk)
                    left -= len(chunk)
                    start = 0
        written += 8 + len(hj) + off
    if a.shards > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: files[shard_of[n]] for n in names},
        }
        json.dump(index, open(os.path.join(a.out, "model.safetensors.index.json"), "w"), indent=1)
    json.dump(cfg, open(os.path.join(a.out, "config.json"), "w"), indent=2)
    for fn in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(os.path.join(TOKENIZER, fn), os.path.join(a.out, fn))
    largest = max(names, key=lambda n: size_of[n])
    print(
        f"wrote {a.out}: {len(names)} tensors in {len(files)} files, {written / 1e9:.3f} GB; "
        f"largest tensor {largest} {size_of[largest] / 1e9:.3f} GB"
    )


if __name__ == "__main__":
    main()
