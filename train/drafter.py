#!/usr/bin/env python3
"""Train a DFlash drafter against an exported target, and export it in the z-lab format Ultra loads.

    python train/drafter.py --target crates/default-model/assets/target --out runs/drafter --time-budget 150 \
        --export runs/export/drafter

Recipe (shared/research/dflash.md §4, SpecForge's DFlash trainer):
1. self-distillation data: prompts = random windows of the training stream (lengths 16..256 tokens, each
   after an <|endoftext|>), or with --mix of the per-domain training streams (`prepare.py tokenize` writes
   code_train / prose_train / math_train.u16) in given shares (with --sampled-prompts, a share of them
   written by the target itself, temperature 1, after their first 16 tokens), continued greedily by the target (the MXFP4
   checkpoint, dequantized exactly) to --seq tokens; the generated part is what the drafter learns (it is
   the target's own greedy output, which is what speculative decoding must predict);
2. target context features: the residual stream after target layers `target_layer_ids` (pre-final-norm for
   the last layer), concatenated per position, computed once for the whole set;
3. random anchors (64 per sequence) in the generated part; each anchor a gives a block
   [token_a, MASK x (B-1)] at positions a .. a+B-1 that sees the context features of positions < a
   (sliding window W: q_pos - k_pos < W) and, causally, its own block; blocks do not see each other;
4. loss: cross-entropy of block row k (k = 1..B-1) against the token at a+k, weighted w_k = exp(-(k-1)/gamma)
   (gamma = 4 for B = 8), normalized by the sum of weights; AdamW, warmup 4 %, cosine, clip 1.0.

Drafter (z-lab DFlash-1, Qwen3 layers): fc [H, K*H] -> hidden_norm -> every layer's k_proj / v_proj (+k_norm,
+RoPE at the context positions) prepended to the block's K/V; no embedding / LM head of its own (the target's).
All layers sliding-window (`layer_types: sliding_attention`, causal), no attention bias.

Evaluation (held-out self-distillation sequences, every k-th, by domain): the mean acceptance length of
random blocks (`tau`) and the acceptance length of the greedy speculative loop (`loop_tau`: anchor at the
first generated position, accept the leading matches + the bonus token, anchor again after them; what
`ultra bench-spec` measures, which weights hard stretches more than random blocks do).

Resume: OUT/selfdistill.pt (data + features are recomputed from it), OUT/state.pt (model, optimizer, step).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import log  # noqa: E402
from gptoss import GptOss, apply_rope, load_hf, rope_cos_sin  # noqa: E402


@dataclass
class DraftConfig:
    hidden_size: int = 256
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    sliding_window: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    block_size: int = 8
    mask_token_id: int = 1
    target_layer_ids: list = field(default_factory=lambda: [1, 3, 5])
    num_target_layers: int = 6
    vocab_size: int = 8192
    max_position_embeddings: int = 2048
    eos_token_id: int = 0
    num_anchors: int = 64
    loss_decay_gamma: float = 4.0

    def zlab_config(self) -> dict:
        n = self.num_hidden_layers
        return {
            "architectures": ["DFlashDraftModel"],
            "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "block_size": self.block_size,
            "bos_token_id": None,
            "dflash_config": {"mask_token_id": self.mask_token_id, "target_layer_ids": self.target_layer_ids,
                              "block_size": self.block_size, "num_anchors": self.num_anchors,
                              "loss_decay_gamma": self.loss_decay_gamma},
            "eos_token_id": self.eos_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": ["sliding_attention"] * n,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": 0,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": n,
            "num_key_value_heads": self.num_key_value_heads,
            "num_target_layers": self.num_target_layers,
            "pad_token_id": self.eos_token_id,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "sliding_window": self.sliding_window,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_cache": True,
            "use_sliding_window": True,
            "vocab_size": self.vocab_size,
        }


def rms(x, w, eps):
    xf = x.float()
    return xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()


class DLayer(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        H, nh, nkv, hd, I = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
        self.input_layernorm = nn.Parameter(torch.ones(H))
        self.post_attention_layernorm = nn.Parameter(torch.ones(H))
        self.q_proj = nn.Linear(H, nh * hd, bias=False)
        self.k_proj = nn.Linear(H, nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)
        self.q_norm = nn.Parameter(torch.ones(hd))
        self.k_norm = nn.Parameter(torch.ones(hd))
        self.gate_proj = nn.Linear(H, I, bias=False)
        self.up_proj = nn.Linear(H, I, bias=False)
        self.down_proj = nn.Linear(I, H, bias=False)


class Drafter(nn.Module):
    def __init__(self, c: DraftConfig):
        super().__init__()
        self.c = c
        K = len(c.target_layer_ids)
        self.fc = nn.Linear(K * c.hidden_size, c.hidden_size, bias=False)
        self.hidden_norm = nn.Parameter(torch.ones(c.hidden_size))
        self.layers = nn.ModuleList(DLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))

    def init_weights(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in self.named_parameters():
                if p.dim() == 2:
                    std = 0.02 / math.sqrt(2 * self.c.num_hidden_layers) if n.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                    p.copy_(torch.randn(p.shape, generator=g) * std)

    def forward(self, feats, ids, anchors, embed_w):
        """feats [B, S, K*H], ids [B, S], anchors [B, A] (sorted positions) -> normed block states [B, A, Bk, H]."""
        c = self.c
        B, S, _ = feats.shape
        A, Bk = anchors.shape[1], c.block_size
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        dev = feats.device
        dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else torch.float32
        ctx = rms(self.fc(feats.to(dt)), self.hidden_norm, c.rms_norm_eps).to(dt)  # [B, S, H]
        blk = torch.full((B, A, Bk), c.mask_token_id, dtype=torch.long, device=dev)
        blk[:, :, 0] = ids.gather(1, anchors)
        h = embed_w[blk].float().view(B, A * Bk, -1)
        off = torch.arange(Bk, device=dev)
        qpos = (anchors[:, :, None] + off).view(B, A * Bk)
        qanc = anchors[:, :, None].expand(B, A, Bk).reshape(B, A * Bk)
        kpos = torch.arange(S, device=dev)
        W = c.sliding_window
        m_ctx = (kpos[None, None, :] < qanc[:, :, None]) & (qpos[:, :, None] - kpos[None, None, :] < W)
        bid = torch.arange(A, device=dev).repeat_interleave(Bk)
        boff = off.repeat(A)
        m_blk = (bid[:, None] == bid[None, :]) & (boff[None, :] <= boff[:, None])
        mask = torch.cat([m_ctx, m_blk.expand(B, -1, -1)], -1)[:, None]  # [B, 1, Q, S + Q]
        cq, sq = rope_cos_sin(qpos.reshape(-1), hd, c.rope_theta)
        cq, sq = cq.view(B, 1, A * Bk, -1), sq.view(B, 1, A * Bk, -1)
        cc, sc = rope_cos_sin(kpos, hd, c.rope_theta)
        rep = nh // nkv
        Q = A * Bk
        for L in self.layers:
            x = rms(h, L.input_layernorm, c.rms_norm_eps).to(dt)
            q = rms(L.q_proj(x).view(B, Q, nh, hd), L.q_norm, c.rms_norm_eps).to(dt).transpose(1, 2)
            kb = rms(L.k_proj(x).view(B, Q, nkv, hd), L.k_norm, c.rms_norm_eps).to(dt).transpose(1, 2)
            vb = L.v_proj(x).view(B, Q, nkv, hd).transpose(1, 2)
            kc = rms(L.k_proj(ctx).view(B, S, nkv, hd), L.k_norm, c.rms_norm_eps).to(dt).transpose(1, 2)
            vc = L.v_proj(ctx).view(B, S, nkv, hd).transpose(1, 2)
            q = apply_rope(q, cq, sq)
            kb = apply_rope(kb, cq, sq)
            kc = apply_rope(kc, cc, sc)
            Kt = torch.cat([kc, kb], 2).repeat_interleave(rep, 1)
            Vt = torch.cat([vc, vb], 2).repeat_interleave(rep, 1)
            o = F.scaled_dot_product_attention(q, Kt, Vt, attn_mask=mask, scale=hd ** -0.5)
            h = h + L.o_proj(o.transpose(1, 2).reshape(B, Q, nh * hd)).float()
            x = rms(h, L.post_attention_layernorm, c.rms_norm_eps).to(dt)
            h = h + L.down_proj(F.silu(L.gate_proj(x)) * L.up_proj(x)).float()
        return rms(h, self.norm, c.rms_norm_eps).to(dt).view(B, A, Bk, -1)


def zlab_tensors(d: Drafter) -> dict[str, torch.Tensor]:
    bf = torch.bfloat16
    t = {"fc.weight": d.fc.weight, "hidden_norm.weight": d.hidden_norm, "norm.weight": d.norm}
    for i, L in enumerate(d.layers):
        p = f"layers.{i}."
        t[p + "input_layernorm.weight"] = L.input_layernorm
        t[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{n}.weight"] = getattr(L, n).weight
        t[p + "self_attn.q_norm.weight"] = L.q_norm
        t[p + "self_attn.k_norm.weight"] = L.k_norm
        for n in ("gate_proj", "up_proj", "down_proj"):
            t[p + f"mlp.{n}.weight"] = getattr(L, n).weight
    return {k: v.detach().to(bf).cpu().contiguous() for k, v in sorted(t.items())}


def load_zlab(d_dir: Path, target_c) -> Drafter:
    """A z-lab drafter dir (as `export_zlab` writes it) -> Drafter (f32, CPU)."""
    from safetensors.torch import load_file

    zc = json.loads((d_dir / "config.json").read_text())
    dc = zc.get("dflash_config", {})
    c = DraftConfig(hidden_size=zc["hidden_size"], num_hidden_layers=zc["num_hidden_layers"],
                    num_attention_heads=zc["num_attention_heads"], num_key_value_heads=zc["num_key_value_heads"],
                    head_dim=zc["head_dim"], intermediate_size=zc["intermediate_size"],
                    sliding_window=zc["sliding_window"], rope_theta=zc["rope_parameters"]["rope_theta"],
                    rms_norm_eps=zc["rms_norm_eps"], block_size=zc["block_size"],
                    mask_token_id=dc["mask_token_id"], target_layer_ids=dc["target_layer_ids"],
                    num_target_layers=zc["num_target_layers"], vocab_size=zc["vocab_size"],
                    max_position_embeddings=target_c.max_position_embeddings, eos_token_id=zc["eos_token_id"],
                    num_anchors=dc.get("num_anchors", 64), loss_decay_gamma=dc.get("loss_decay_gamma", 4.0))
    d = Drafter(c)
    t = load_file(str(d_dir / "model.safetensors"))
    params = dict(d.named_parameters())
    names = {k: k.replace("self_attn.", "").replace("mlp.", "") for k in t}
    names = {k: (v if v in params else v.removesuffix(".weight")) for k, v in names.items()}
    missing = set(params) - set(names.values())
    if missing or any(v not in params for v in names.values()):
        raise ValueError(f"{d_dir}: tensors do not match the drafter (missing {sorted(missing)})")
    with torch.no_grad():
        for k, v in names.items():
            params[v].copy_(t[k].float())
    return d


def export_zlab(d: Drafter, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(zlab_tensors(d), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(d.c.zlab_config(), indent=2) + "\n")


# ---- target side -------------------------------------------------------------------------------------


@torch.no_grad()
def greedy_generate(t: GptOss, prompts: torch.Tensor, total: int, dev, sample_until: int = 0,
                    gen: torch.Generator | None = None) -> torch.Tensor:
    """prompts [N, P] -> [N, total] (prompt + greedy continuation), KV-cached, bf16 on the GPU. Positions
    below `sample_until` are sampled at temperature 1 instead (with `gen`): the target writes part of its own
    prompt, text it has not seen in training."""
    N, P = prompts.shape
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    caches = t.new_cache(N, total, dtype, dev, padded=True)
    out = torch.zeros(N, total, dtype=torch.long, device=dev)
    out[:, :P] = prompts
    was = t.dense_moe_max
    try:
        with common.autocast(dev):
            logits = t(prompts, caches=caches, pos0=0, last_only=True)["logits"]
            t.dense_moe_max = 8192  # one token per sequence per step: dense experts, no host sync
            for pos in range(P, total):
                if pos < sample_until:
                    nxt = torch.multinomial(logits[:, -1].float().softmax(-1), 1, generator=gen)[:, 0]
                else:
                    nxt = logits[:, -1].float().argmax(-1)
                out[:, pos] = nxt
                if pos + 1 == total:
                    break
                logits = t(nxt[:, None], caches=caches, pos0=pos, last_only=True)["logits"]
    finally:
        t.dense_moe_max = was
    return out


@torch.no_grad()
def target_features(t: GptOss, seqs: torch.Tensor, layer_ids: list[int], dev, batch: int = 64) -> torch.Tensor:
    """[N, S] -> [N, S, K*H] bf16 on `dev` (the residual stream after each target layer, concatenated)."""
    N, S = seqs.shape
    out = torch.empty(N, S, len(layer_ids) * t.c.hidden_size, dtype=torch.bfloat16, device=dev)
    for i in range(0, N, batch):
        x = seqs[i: i + batch].to(dev)
        with common.autocast(dev):
            hs = t(x, capture=tuple(layer_ids))["hidden"]
        out[i: i + batch] = torch.cat([hs[j] for j in layer_ids], -1).to(torch.bfloat16)
    return out


def make_prompts(tokens, n: int, plen: int, seed: int):
    import numpy as np

    g = np.random.default_rng(seed)
    starts = g.integers(0, tokens.size - plen, n)
    idx = starts[:, None] + np.arange(plen - 1)[None, :]
    body = torch.from_numpy(tokens[idx].astype(np.int64))
    return torch.cat([torch.zeros(n, 1, dtype=torch.long), body], 1)  # <|endoftext|> first, as the tokenizer adds


def eval_prompt_sets(tok_dir: Path, eval_dir: Path) -> dict[str, list[list[int]]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    return {n: [tok.encode(it["prompt"]).ids for it in common.read_jsonl(eval_dir / f"{n}.jsonl")]
            for n in ("code", "math", "prose")}


# ---- training ----------------------------------------------------------------------------------------


def sample_anchors(plen: torch.Tensor, S: int, Bk: int, A: int, g: torch.Generator, dev,
                   end: torch.Tensor | None = None) -> torch.Tensor:
    """A sorted anchors per sequence, uniform without replacement in [plen, end - Bk] (end: S by default)."""
    N = plen.shape[0]
    pos = torch.arange(S, device=dev)[None, :]
    last = (S - Bk) if end is None else (end - Bk)[:, None]
    ok = (pos >= plen[:, None]) & (pos <= last)
    r = torch.rand(N, S, generator=g, device="cpu").to(dev)
    r = torch.where(ok, r, torch.full_like(r, -1.0))
    return r.topk(A, -1).indices.sort(-1).values


def target_logits(head: "TargetHead", feats, pos):
    """The target's own logits at positions `pos` [B, A, k] (predicting pos + 1), from the last layer's
    features (pre-final-norm residual, the last slice of `feats`)."""
    H = head.norm.shape[0]
    B, A, k = pos.shape
    h = feats[..., -H:].gather(1, pos.reshape(B, -1, 1).expand(-1, -1, H)).view(B, A, k, H)
    return F.linear(rms(h, head.norm, head.eps).to(head.embed.dtype), head.embed)


@dataclass
class TargetHead:
    """What `target_logits` needs: the target's final norm, its epsilon and (tied) LM head."""
    norm: torch.Tensor
    eps: float
    embed: torch.Tensor


def block_loss(d: Drafter, feats, ids, anchors, embed_w, gamma: float, kl: float = 0.0,
               head: TargetHead | None = None):
    """Decayed cross-entropy of block rows 1..B-1 against the sequence tokens; with `kl` > 0, plus `kl` times
    the equally weighted KL(target || drafter) against the target's own distributions at those positions
    (soft labels: the target features' last slice through the target's final norm and LM head)."""
    c = d.c
    Bk = c.block_size
    hs = d(feats, ids, anchors, embed_w)[:, :, 1:]  # rows 1..B-1
    logits = F.linear(hs, embed_w.to(hs.dtype))  # the target's (tied) LM head
    lab_pos = anchors[:, :, None] + torch.arange(1, Bk, device=ids.device)
    labels = ids.gather(1, lab_pos.view(ids.shape[0], -1)).view(lab_pos.shape)
    w = torch.exp(-(torch.arange(1, Bk, device=ids.device, dtype=torch.float32) - 1) / gamma)
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    ce = ce.view(labels.shape)
    norm = w.sum() * labels.shape[0] * labels.shape[1]
    loss = (ce * w).sum() / norm
    if kl > 0:
        with torch.no_grad():
            logp_t = F.log_softmax(target_logits(head, feats, lab_pos - 1).float(), -1)
        logp_d = F.log_softmax(logits.float(), -1)
        kl_rows = (logp_t.exp() * (logp_t - logp_d)).sum(-1)
        loss = loss + kl * (kl_rows * w).sum() / norm
    with torch.no_grad():
        hit = (logits.argmax(-1) == labels)
        acc = hit.float().mean((0, 1))
        # acceptance length of each block if it were verified: 1 + leading matches
        tau = 1 + hit.long().cumprod(-1).sum(-1).float().mean()
    return loss, acc, tau


@torch.no_grad()
def loop_tau(d, feats, seqs, plen, embed_w, dev, batch: int = 16) -> tuple[list[int], list[int]]:
    """The greedy speculative loop on each sequence's continuation (the target's greedy output): the first
    block is anchored at the first generated position; a block accepts its leading draft matches plus the
    bonus token and the next block is anchored after them, up to the last full block. Returns the tokens
    and rounds of each sequence."""
    d.eval()
    Bk = d.c.block_size
    S = seqs.shape[1]
    toks, rounds = [], []
    for i in range(0, seqs.shape[0], batch):
        s, f, p = seqs[i: i + batch].to(dev), feats[i: i + batch].to(dev), plen[i: i + batch].tolist()
        a0 = min(p)
        anc = torch.arange(a0, S - Bk + 1, device=dev)[None].expand(s.shape[0], -1).contiguous()
        with common.autocast(dev):
            hs = d(f, s, anc, embed_w)[:, :, 1:]
            pred = F.linear(hs, embed_w.to(hs.dtype)).argmax(-1)
        lab_pos = anc[:, :, None] + torch.arange(1, Bk, device=dev)
        labels = s.gather(1, lab_pos.view(s.shape[0], -1)).view(lab_pos.shape)
        m = (pred == labels).long().cumprod(-1).sum(-1).cpu()
        for r, a in enumerate(p):
            n_tok = n_round = 0
            while a <= S - Bk:
                k = int(m[r, a - a0])
                a += k + 1
                n_tok += k + 1
                n_round += 1
            toks.append(n_tok)
            rounds.append(n_round)
    d.train()
    return toks, rounds


@torch.no_grad()
def estimate_tau(d, feats, seqs, plen, embed_w, dev, A: int = 64, seed: int = 99, end=None) -> dict:
    """Mean acceptance length over random blocks of held-out greedy continuations (the sequences are the
    target's own greedy output, so a draft token is accepted iff it equals the next sequence token)."""
    d.eval()
    g = torch.Generator().manual_seed(seed)
    taus, accs = [], []
    S = seqs.shape[1]
    room = (S if end is None else end) - d.c.block_size + 1 - plen
    A = max(1, min(A, int(room.min())))
    for i in range(0, seqs.shape[0], 32):
        s = seqs[i: i + 32].to(dev)
        f = feats[i: i + 32].to(dev)
        anc = sample_anchors(plen[i: i + 32].to(dev), s.shape[1], d.c.block_size, A, g, dev,
                             None if end is None else end[i: i + 32].to(dev))
        with common.autocast(dev):
            _, acc, tau = block_loss(d, f, s, anc, embed_w, d.c.loss_decay_gamma)
        taus.append(float(tau) * s.shape[0])
        accs.append(acc * s.shape[0])
    d.train()
    n = seqs.shape[0]
    return {"tau": sum(taus) / n, "acc_per_position": [round(float(x), 3) for x in sum(accs) / n]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True, help="exported target dir (config.json + model.safetensors)")
    ap.add_argument("--data", default=str(common.HERE / "build/tokens/train.u16"))
    ap.add_argument("--mix", help="prompts by domain instead of --data: NAME:SHARE,... from DATA_DIR/NAME_train.u16 "
                                  "(e.g. code:0.5,prose:0.25,math:0.25)")
    ap.add_argument("--data-dir", default=str(common.HERE / "build/tokens"))
    ap.add_argument("--eval-dir", default=str(common.HERE / "eval"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--export", help="write the z-lab drafter dir here at the end")
    ap.add_argument("--config", help="JSON overrides of DraftConfig")
    ap.add_argument("--sequences", type=int, default=8192, help="self-distillation sequences")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--prompt-lens", default="16,48,128,256")
    ap.add_argument("--gen-batch", type=int, default=2048)
    ap.add_argument("--sampled-prompts", type=float, default=0.0,
                    help="share of prompts of which the target samples (temperature 1) all but the first "
                         "--sampled-keep tokens: continuations of text it has not memorized, as on held-out data")
    ap.add_argument("--sampled-keep", type=int, default=16)
    ap.add_argument("--gen-budget", type=float, default=90.0, help="seconds: start no new prompt group after this")
    ap.add_argument("--eval-new-tokens", type=int, default=96)
    ap.add_argument("--eval-prompts", type=int, default=16, help="eval prompts per set for the tau estimate")
    ap.add_argument("--feature-batch", type=int, default=64, help="sequences per target pass for the features")
    ap.add_argument("--holdout", type=int, default=256, help="self-distillation sequences kept out of training")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--init", help="start from this z-lab drafter dir (its config wins over --config)")
    ap.add_argument("--kl", type=float, default=0.0,
                    help="weight of KL(target || drafter) against the target's distributions (0: hard labels only)")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--time-budget", type=float)
    ap.add_argument("--seed", type=int, default=4321)
    ap.add_argument("--save-every", type=float, default=60.0)
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args()
    if not args.steps and not args.time_budget:
        ap.error("give --steps or --time-budget")
    dev = common.device()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tgt_dir = Path(args.target)
    t = load_hf(tgt_dir, dev).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    over = json.loads(args.config) if args.config else {}
    tc = t.c
    c = DraftConfig(**{"hidden_size": tc.hidden_size, "num_target_layers": tc.num_hidden_layers,
                       "vocab_size": tc.vocab_size, "max_position_embeddings": tc.max_position_embeddings,
                       "target_layer_ids": [1, 3, 5] if tc.num_hidden_layers == 6 else
                       sorted({1, tc.num_hidden_layers // 2, tc.num_hidden_layers - 1}), **over})
    init_d = None
    if args.init:
        init_d = load_zlab(Path(args.init), tc)
        c = init_d.c
        log(f"initialized from {args.init}")
    log("drafter config", json.dumps(asdict(c)))
    embed_w = t.embed.weight.detach()
    head = TargetHead(t.norm.detach(), tc.rms_norm_eps, embed_w)
    if args.kl > 0 and c.target_layer_ids[-1] != tc.num_hidden_layers - 1:
        ap.error("--kl needs the target's last layer among target_layer_ids (its features give the soft labels)")

    # ---- 1. self-distillation data (+ held-out continuations of the eval prompts)
    sd_path = out / "selfdistill.pt"
    if sd_path.exists():
        sd = torch.load(sd_path, map_location="cpu", weights_only=False)
        log(f"self-distillation data: {sd['seqs'].shape} (cached)")
    else:
        plens = [int(x) for x in args.prompt_lens.split(",")]
        if args.mix:
            mix = [(n, float(w)) for n, w in (x.split(":") for x in args.mix.split(","))]
            wsum = sum(w for _, w in mix)
            sources = [(n, common.load_tokens(Path(args.data_dir) / f"{n}_train.u16"),
                        int(round(args.sequences * w / wsum))) for n, w in mix]
        else:
            sources = [("train", common.load_tokens(Path(args.data)), args.sequences)]
        seqs, plen, dom = [], [], []
        t0 = time.time()
        # prompt-length-major order, so a generation budget drops the longest prompts of every domain alike
        for j, P in enumerate(plens):
            if seqs and time.time() - t0 > args.gen_budget:
                log(f"generation budget reached before prompt length {P}")
                break
            for di, (name, tokens, count) in enumerate(sources):
                per = count // len(plens)
                pr = make_prompts(tokens, per, P, args.seed + j + 1000 * di)
                n_sampled = int(round(per * args.sampled_prompts))  # the first ones: written by the target
                for i in range(0, per, args.gen_batch):
                    b = pr[i: i + args.gen_batch].to(dev)
                    k = max(0, min(b.shape[0], n_sampled - i))
                    if k and P > args.sampled_keep:
                        gen = torch.Generator(device=dev).manual_seed(args.seed * 31 + j * 1009 + di * 97 + i)
                        b = torch.cat([greedy_generate(t, b[:k, :args.sampled_keep], P, dev, P, gen), b[k:]])
                    seqs.append(greedy_generate(t, b, args.seq, dev).cpu())
                    plen.append(torch.full((seqs[-1].shape[0],), P))
                    dom.append(torch.full((seqs[-1].shape[0],), di))
        seqs, plen, dom = torch.cat(seqs), torch.cat(plen), torch.cat(dom)
        log(f"generated {seqs.shape[0]} x {args.seq} ({(seqs.shape[0] * args.seq - int(plen.sum())):,} new tokens) "
            f"in {time.time() - t0:.0f}s: " + ", ".join(f"{n} {int((dom == i).sum())}" for i, (n, _, _) in enumerate(sources)))
        ev = {}
        sets = eval_prompt_sets(tgt_dir, Path(args.eval_dir)) if args.eval_prompts > 0 else {}
        for name, prompts in sets.items():
            ss, pl, ln = [], [], []
            for p in prompts[: args.eval_prompts]:
                p = p[-(args.seq - args.eval_new_tokens):]
                s = greedy_generate(t, torch.tensor([p], device=dev), len(p) + args.eval_new_tokens, dev).cpu()[0]
                ss.append(torch.cat([s, torch.zeros(args.seq - s.numel(), dtype=torch.long)]))
                pl.append(len(p))
                ln.append(s.numel())
            ev[name] = {"seqs": torch.stack(ss), "plen": torch.tensor(pl), "len": torch.tensor(ln)}
        sd = {"seqs": seqs, "plen": plen, "dom": dom, "domains": [n for n, _, _ in sources], "eval": ev}
        common.save_atomic(sd, sd_path)
    seqs, plen = sd["seqs"], sd["plen"]
    dom = sd.get("dom", torch.zeros_like(plen))
    domains = sd.get("domains", ["train"])
    t0 = time.time()
    feats = target_features(t, seqs, c.target_layer_ids, dev, batch=args.feature_batch)
    ev_feats = {n: target_features(t, e["seqs"], c.target_layer_ids, dev) for n, e in sd["eval"].items()}
    log(f"target features {tuple(feats.shape)} in {time.time() - t0:.0f}s")
    seqs = seqs.to(dev)
    plen = plen.to(dev)
    H = max(1, min(args.holdout, seqs.shape[0] // 4))
    hold = (torch.arange(seqs.shape[0], device=dev) % (seqs.shape[0] // H)) == 0  # every k-th: all prompt lengths
    hold_idx, train_idx = hold.nonzero().flatten(), (~hold).nonzero().flatten()  # (no copy of the features)
    hold_seqs, hold_feats, hold_plen, hold_dom = seqs[hold_idx], feats[hold_idx], plen[hold_idx], dom.to(dev)[hold_idx]

    # ---- 2. training
    if init_d is not None:
        d = init_d
    else:
        d = Drafter(c)
        d.init_weights(args.seed)
    d = d.to(dev)
    opt = torch.optim.AdamW(d.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=dev.type == "cuda")
    step, total, train_time = 0, args.steps, 0.0
    st_path = out / "state.pt"
    if st_path.exists():
        st = torch.load(st_path, map_location=dev, weights_only=False)
        d.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, total, train_time = st["step"], st["total"], st["train_time"]
        log(f"resumed at step {step}/{total}")

    def save():
        common.save_atomic({"model": d.state_dict(), "opt": opt.state_dict(), "step": step, "total": total,
                            "train_time": train_time, "config": asdict(c)}, st_path)

    last_save = time.time()
    t_mark = None
    N = train_idx.numel()
    while total is None or step < total:
        if total is None and step == 5:
            torch.cuda.synchronize() if dev.type == "cuda" else None
            t_mark = time.time()
        if total is None and step == 25:
            torch.cuda.synchronize() if dev.type == "cuda" else None
            per = (time.time() - t_mark) / 20
            total = max(step + 1, int(args.time_budget / per))
            log(f"{per * 1e3:.1f} ms/step -> {total} steps (reproduce with --steps {total})")
        t1 = time.time()
        warm = max(1, int(0.04 * (total or 1000)))
        lr = common.lr_at(step, total or 10**9, args.lr, warm, 0.05)
        for gp in opt.param_groups:
            gp["lr"] = lr
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        idx = train_idx[torch.randint(0, N, (args.batch,), generator=g).to(dev)]
        anc = sample_anchors(plen[idx], args.seq, c.block_size, c.num_anchors, g, dev)
        with common.autocast(dev):
            loss, acc, tau = block_loss(d, feats[idx].to(dev), seqs[idx], anc, embed_w, c.loss_decay_gamma,
                                        args.kl, head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
        opt.step()
        step += 1
        if step % args.log_every == 0 or step == 1 or step == total:
            log(f"step {step}/{total} loss {float(loss.detach()):.4f} tau(train blocks) {float(tau):.2f} "
                f"acc {[round(float(a), 2) for a in acc]} gnorm {float(gn):.2f} lr {lr:.2e}")
        train_time += time.time() - t1
        if time.time() - last_save > args.save_every:
            save()
            last_save = time.time()
    save()
    metrics = {"steps": step, "train_time_s": train_time, "config": asdict(c)}
    metrics["tau_estimate_selfdistill_holdout"] = estimate_tau(d, hold_feats, hold_seqs, hold_plen, embed_w, dev)
    log("held-out self-distillation blocks", json.dumps(metrics["tau_estimate_selfdistill_holdout"]))
    toks, rounds = loop_tau(d, hold_feats, hold_seqs, hold_plen, embed_w, dev)
    hd = hold_dom.cpu()
    for i, name in enumerate(domains):
        sel = (hd == i).nonzero().flatten().tolist()
        if not sel:
            continue
        r = {"sequences": len(sel),
             "loop_tau": sum(toks[k] for k in sel) / max(1, sum(rounds[k] for k in sel))}
        r.update(estimate_tau(d, hold_feats[hd.to(dev) == i], hold_seqs[hd.to(dev) == i],
                              hold_plen[hd.to(dev) == i], embed_w, dev))
        metrics[f"holdout_{name}"] = r
        log(f"held-out {name}", json.dumps(r))
    for n, e in sd["eval"].items():
        # anchors inside each continuation only (sequences are zero-padded after `len`)
        metrics[f"tau_estimate_{n}"] = estimate_tau(d, ev_feats[n], e["seqs"], e["plen"], embed_w, dev,
                                                    A=16, end=e["len"])
        log(f"eval set {n}", json.dumps(metrics[f"tau_estimate_{n}"]))
    common.write_json(out / "metrics.json", metrics)
    if args.export:
        export_zlab(d, Path(args.export))
        log("exported", args.export)
    return 0


if __name__ == "__main__":
    sys.exit(main())
