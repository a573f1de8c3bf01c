"""A gpt-oss-architecture MoE in plain PyTorch, for training; export to / import from the Hugging Face layout.

Same math as transformers' `GptOssForCausalLM` (and Ultra's CPU executor):
* pre-norm decoder layers (RMSNorm, eps from the config), residual stream in float32;
* attention: q/k/v/o with biases, GQA, RoPE on the whole head (gpt-oss half split), scale 1/sqrt(head_dim),
  a learned per-head sink logit that joins the softmax denominator only, layers alternating
  sliding-window (a key is visible iff 0 <= q - k < window) and full causal attention;
* MoE: router linear with bias -> top-k logits -> softmax over the k, experts with biases, gate/up rows
  interleaved (gate = even rows, up = odd rows), clamped SwiGLU: gate <= limit, -limit <= up <= limit,
  out = (up + 1) * gate * sigmoid(alpha * gate), weighted sum of the k experts;
* final RMSNorm, LM head (tied to the embedding here: `tie_word_embeddings`).

Experts are kept as [E, out, in] (the MXFP4 checkpoint order; HF's dense order is [E, in, out]).
With `qat` set to a scale rule ("floor" / "up") the expert matrices go through `mxfp4.fake_quant` in the
forward (straight-through gradient), i.e. the model computes with exactly the shipped MXFP4 values.

Attention runs through `F.scaled_dot_product_attention` with the sink as one extra key: q gets an extra
component 1, the sink key the component sink/scale, its value 0 (keys padded to a multiple of 8).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import mxfp4

PAD = 8  # extra q/k components: [sink selector, zeros...]


@dataclass
class Config:
    vocab_size: int = 8192
    hidden_size: int = 256
    num_hidden_layers: int = 6
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 320
    num_local_experts: int = 16
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    eos_token_id: int = 0
    router_aux_loss_coef: float = 0.01
    layer_types: list = field(default_factory=list)

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                                for i in range(self.num_hidden_layers)]

    def hf_config(self, mxfp4_experts: bool) -> dict:
        c = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "bos_token_id": self.eos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.eos_token_id,
            "dtype": "bfloat16",
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": self.layer_types,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.num_experts_per_tok,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts,
            "output_router_logits": False,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "sliding_window": self.sliding_window,
            "swiglu_alpha": self.swiglu_alpha,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if mxfp4_experts:
            c["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"],
            }
        return c

    @staticmethod
    def from_hf(c: dict) -> "Config":
        rp = c.get("rope_parameters") or {}
        if rp.get("rope_type", "default") != "default":
            raise ValueError(f"rope type {rp.get('rope_type')} is not supported by this trainer")
        return Config(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=c["num_attention_heads"], num_key_value_heads=c["num_key_value_heads"],
            head_dim=c["head_dim"], intermediate_size=c["intermediate_size"],
            num_local_experts=c["num_local_experts"], num_experts_per_tok=c["num_experts_per_tok"],
            sliding_window=c["sliding_window"], rope_theta=rp.get("rope_theta", c.get("rope_theta", 10000.0)),
            rms_norm_eps=c["rms_norm_eps"], swiglu_alpha=c.get("swiglu_alpha", 1.702),
            swiglu_limit=c.get("swiglu_limit", 7.0), max_position_embeddings=c["max_position_embeddings"],
            tie_word_embeddings=c.get("tie_word_embeddings", False), eos_token_id=c.get("eos_token_id", 0),
            router_aux_loss_coef=c.get("router_aux_loss_coef", 0.01), layer_types=c["layer_types"])


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)) * w.float()


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin [T, dim/2] (float32) for positions [T]."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim))
    ang = positions.float()[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d]; cos/sin [T, d/2] (or [B, 1, T, d/2]); half-split rotation (gpt-oss / NeoX)."""
    x1, x2 = x.float().chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def attention_with_sinks(q, k, v, sinks, mask, scale):
    """q [B, nh, T, d], k/v [B, nkv, S, d], sinks [nh], mask bool broadcastable to [B, nh, T, S] (True =
    visible) -> [B, nh, T, d].  softmax over [scores, sink] with the sink column dropped (HF eager)."""
    B, nh, T, d = q.shape
    S = k.shape[2]
    rep = nh // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, 1)
        v = v.repeat_interleave(rep, 1)
    dt = q.dtype
    one = torch.ones(B, nh, T, 1, dtype=dt, device=q.device)
    q2 = torch.cat([q, one, torch.zeros(B, nh, T, PAD - 1, dtype=dt, device=q.device)], -1)
    k2 = torch.cat([k, torch.zeros(B, nh, S, PAD, dtype=dt, device=q.device)], -1)
    v2 = torch.cat([v, torch.zeros(B, nh, S, PAD, dtype=dt, device=q.device)], -1)
    sink_k = torch.zeros(nh, PAD, d + PAD, dtype=dt, device=q.device)
    sink_k[:, 0, d] = 1.0
    sink_k = sink_k * (sinks.to(dt) / scale).view(nh, 1, 1)  # only [h, 0, d] is nonzero
    sink_k = sink_k.unsqueeze(0).expand(B, nh, PAD, d + PAD)
    K = torch.cat([k2, sink_k], 2)
    V = torch.cat([v2, torch.zeros(B, nh, PAD, d + PAD, dtype=dt, device=q.device)], 2)
    extra = torch.zeros(PAD, dtype=torch.bool, device=q.device)
    extra[0] = True
    m = torch.cat([mask, extra.expand(*mask.shape[:-1], PAD)], -1)
    out = F.scaled_dot_product_attention(q2, K, V, attn_mask=m, scale=scale)
    return out[..., :d]


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    d = q_pos[:, None] - k_pos[None, :]
    m = d >= 0
    if window is not None:
        m &= d < window
    return m


class Layer(nn.Module):
    def __init__(self, c: Config, i: int):
        super().__init__()
        H, nh, nkv, hd, E, I = (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
                                c.num_local_experts, c.intermediate_size)
        self.window = c.sliding_window if c.layer_types[i] == "sliding_attention" else None
        self.input_layernorm = nn.Parameter(torch.ones(H))
        self.post_attention_layernorm = nn.Parameter(torch.ones(H))
        self.q_proj = nn.Linear(H, nh * hd)
        self.k_proj = nn.Linear(H, nkv * hd)
        self.v_proj = nn.Linear(H, nkv * hd)
        self.o_proj = nn.Linear(nh * hd, H)
        self.sinks = nn.Parameter(torch.zeros(nh))
        self.router = nn.Linear(H, E)
        self.gate_up = nn.Parameter(torch.empty(E, 2 * I, H))
        self.gate_up_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.down = nn.Parameter(torch.empty(E, H, I))
        self.down_bias = nn.Parameter(torch.zeros(E, H))


class GptOss(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Layer(c, i) for i in range(c.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(c.hidden_size))
        self.lm_head = None if c.tie_word_embeddings else nn.Parameter(torch.empty(c.vocab_size, c.hidden_size))
        self.qat: str | None = None  # MXFP4 scale rule for fake-quantized experts
        self.dense_moe_max = 0  # eval only: up to this many tokens, run every expert densely (decode speed)
        self.init_weights()

    def init_weights(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        std = 0.02
        out_std = std / math.sqrt(2 * self.c.num_hidden_layers)

        def normal_(t, s):
            with torch.no_grad():
                t.copy_(torch.randn(t.shape, generator=g) * s)

        normal_(self.embed.weight, std)
        if self.lm_head is not None:
            normal_(self.lm_head, std)
        for L in self.layers:
            for lin in (L.q_proj, L.k_proj, L.v_proj, L.router):
                normal_(lin.weight, std)
                nn.init.zeros_(lin.bias)
            normal_(L.o_proj.weight, out_std)
            nn.init.zeros_(L.o_proj.bias)
            normal_(L.gate_up, std)
            normal_(L.down, out_std)

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head

    def expert_weights(self, L: Layer) -> tuple[torch.Tensor, torch.Tensor]:
        if self.qat:
            return mxfp4.fake_quant(L.gate_up, self.qat), mxfp4.fake_quant(L.down, self.qat)
        return L.gate_up, L.down

    # ---- blocks -----------------------------------------------------------------------------------
    def attn(self, L: Layer, x, cos, sin, mask, cache=None, pos0: int = 0):
        """x [B, T, H] (normed); cache: dict with k/v [B, nkv, maxlen, d] filled up to pos0."""
        c = self.c
        B, T, _ = x.shape
        q = L.q_proj(x).view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = L.k_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = L.v_proj(x).view(B, T, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None and "K" in cache:
            o = self._attn_padded_cache(L, q, k, v, cache, pos0)
        else:
            if cache is not None:
                cache["k"][:, :, pos0: pos0 + T] = k
                cache["v"][:, :, pos0: pos0 + T] = v
                k = cache["k"][:, :, : pos0 + T]
                v = cache["v"][:, :, : pos0 + T]
            o = attention_with_sinks(q, k, v, L.sinks, mask, c.head_dim ** -0.5)
        return L.o_proj(o.transpose(1, 2).reshape(B, T, -1))

    def _attn_padded_cache(self, L: Layer, q, k, v, cache, pos0: int):
        """Decode-speed variant of `attention_with_sinks` over a cache kept in its final SDPA form:
        K/V [B, nh, maxlen + PAD, d + PAD] (GQA already expanded, sink key at slot maxlen), so a step
        copies only the new rows.  Same math."""
        c = self.c
        B, nh, T, d = q.shape
        scale = d ** -0.5
        K, V, maxlen = cache["K"], cache["V"], cache["maxlen"]
        if not cache["sink_set"]:
            K[:, :, maxlen, d] = (L.sinks.to(K.dtype) / scale)[None, :]
            cache["sink_set"] = True
        rep = nh // k.shape[1]
        K[:, :, pos0: pos0 + T, :d] = k.repeat_interleave(rep, 1)
        V[:, :, pos0: pos0 + T, :d] = v.repeat_interleave(rep, 1)
        pos = torch.arange(pos0, pos0 + T, device=q.device)
        m = causal_mask(pos, torch.arange(maxlen, device=q.device), L.window)
        extra = torch.zeros(T, PAD, dtype=torch.bool, device=q.device)
        extra[:, 0] = True
        m = torch.cat([m, extra], -1)
        q2 = torch.cat([q, torch.ones(B, nh, T, 1, dtype=q.dtype, device=q.device),
                        torch.zeros(B, nh, T, PAD - 1, dtype=q.dtype, device=q.device)], -1)
        return F.scaled_dot_product_attention(q2, K, V, attn_mask=m, scale=scale)[..., :d]

    def moe(self, L: Layer, x: torch.Tensor):
        """x [N, H] (normed) -> ([N, H], aux load-balancing loss)."""
        c = self.c
        E, k = c.num_local_experts, c.num_experts_per_tok
        logits = L.router(x)
        topv, topi = logits.topk(k, -1)
        w = torch.softmax(topv.float(), -1)
        flat = topi.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=E)
        sizes = counts.tolist()  # one host sync per layer
        tok = order // k
        xs = x[tok]
        gu_w, dn_w = self.expert_weights(L)
        if not self.training and x.shape[0] <= self.dense_moe_max:
            # decode: every expert on every token (a few batched matmuls, no host sync), top-k weights
            gu = torch.einsum("nh,eoh->neo", x, gu_w.to(x.dtype)) + L.gate_up_bias.to(x.dtype)
            gate, up = gu[..., ::2].float(), gu[..., 1::2].float()
            gate = gate.clamp(max=c.swiglu_limit)
            up = up.clamp(-c.swiglu_limit, c.swiglu_limit)
            h = ((up + 1) * gate * torch.sigmoid(gate * c.swiglu_alpha)).to(x.dtype)
            ya = torch.einsum("nei,ehi->neh", h, dn_w.to(x.dtype)) + L.down_bias.to(x.dtype)
            wd = torch.zeros(x.shape[0], E, dtype=torch.float32, device=x.device).scatter_(1, topi, w)
            return (ya.float() * wd[..., None]).sum(1), None
        outs = []
        for e, (chunk, n) in enumerate(zip(xs.split(sizes), sizes)):
            if n == 0:
                continue
            gu = F.linear(chunk, gu_w[e], L.gate_up_bias[e])
            gate, up = gu[..., ::2].float(), gu[..., 1::2].float()
            gate = gate.clamp(max=c.swiglu_limit)
            up = up.clamp(-c.swiglu_limit, c.swiglu_limit)
            h = (up + 1) * gate * torch.sigmoid(gate * c.swiglu_alpha)
            outs.append(F.linear(h.to(chunk.dtype), dn_w[e], L.down_bias[e]))
        ys = torch.cat(outs).float() * w.reshape(-1)[order, None]
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, tok, ys)
        aux = None
        if self.training:
            frac = counts.float() / flat.numel()
            prob = torch.softmax(logits.float(), -1).mean(0)
            aux = E * (frac * prob).sum()
        return y, aux

    def forward(self, ids: torch.Tensor, capture: tuple[int, ...] = (), caches=None, pos0: int = 0,
                last_only: bool = False):
        """ids [B, T] -> dict(logits [B, T, V] (or [B, 1, V]), aux, hidden {layer: [B, T, H]}).

        caches: list of per-layer dicts (see `new_cache`) for incremental decoding from position pos0."""
        c = self.c
        B, T = ids.shape
        dev = ids.device
        h = self.embed(ids).float()
        pos = torch.arange(pos0, pos0 + T, device=dev)
        cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta)
        kpos = torch.arange(0, pos0 + T, device=dev)
        masks = {w: causal_mask(pos, kpos, w) for w in {L.window for L in self.layers}}
        aux_total = torch.zeros((), device=dev)
        hidden = {}
        dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else torch.float32
        for i, L in enumerate(self.layers):
            x = rms_norm(h, L.input_layernorm, c.rms_norm_eps).to(dt)
            h = h + self.attn(L, x, cos, sin, masks[L.window], None if caches is None else caches[i], pos0).float()
            x = rms_norm(h, L.post_attention_layernorm, c.rms_norm_eps).to(dt)
            y, aux = self.moe(L, x.reshape(B * T, -1))
            h = h + y.view(B, T, -1)
            if aux is not None:
                aux_total = aux_total + aux
            if i in capture:
                hidden[i] = h
        if last_only:
            h = h[:, -1:]
        x = rms_norm(h, self.norm, c.rms_norm_eps).to(dt)
        logits = F.linear(x, self.head_weight().to(dt))
        return {"logits": logits, "aux": aux_total / len(self.layers), "hidden": hidden}

    def new_cache(self, B: int, maxlen: int, dtype, device, padded: bool = False):
        """Per-layer KV caches; `padded`: the decode-speed layout of `_attn_padded_cache`."""
        c = self.c
        if padded:
            shape = (B, c.num_attention_heads, maxlen + PAD, c.head_dim + PAD)
            return [{"K": torch.zeros(shape, dtype=dtype, device=device), "V": torch.zeros(shape, dtype=dtype, device=device),
                     "maxlen": maxlen, "sink_set": False} for _ in self.layers]
        return [{"k": torch.zeros(B, c.num_key_value_heads, maxlen, c.head_dim, dtype=dtype, device=device),
                 "v": torch.zeros(B, c.num_key_value_heads, maxlen, c.head_dim, dtype=dtype, device=device)}
                for _ in self.layers]

    @torch.no_grad()
    def quantize_experts_(self, rounding: str) -> None:
        """Replace every expert matrix by its MXFP4 value (post-training quantization / the shipped model)."""
        for L in self.layers:
            L.gate_up.copy_(mxfp4.dequantize_values(L.gate_up.to(torch.bfloat16), rounding))
            L.down.copy_(mxfp4.dequantize_values(L.down.to(torch.bfloat16), rounding))


# ---- Hugging Face layout ------------------------------------------------------------------------------


def hf_tensors(m: GptOss, mxfp4_rounding: str | None) -> dict[str, torch.Tensor]:
    """The checkpoint tensors: bf16 everywhere, experts either dense bf16 [E, in, out] (HF order) or MXFP4
    `*_blocks` [E, out, in/32, 16] + `*_scales` [E, out, in/32] (from bf16(weight), the given scale rule)."""
    bf = torch.bfloat16
    t = {"model.embed_tokens.weight": m.embed.weight.detach().to(bf), "model.norm.weight": m.norm.detach().to(bf)}
    if m.lm_head is not None:
        t["lm_head.weight"] = m.lm_head.detach().to(bf)
    for i, L in enumerate(m.layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = L.input_layernorm.detach().to(bf)
        t[p + "post_attention_layernorm.weight"] = L.post_attention_layernorm.detach().to(bf)
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            lin = getattr(L, n)
            t[p + f"self_attn.{n}.weight"] = lin.weight.detach().to(bf)
            t[p + f"self_attn.{n}.bias"] = lin.bias.detach().to(bf)
        t[p + "self_attn.sinks"] = L.sinks.detach().to(bf)
        t[p + "mlp.router.weight"] = L.router.weight.detach().to(bf)
        t[p + "mlp.router.bias"] = L.router.bias.detach().to(bf)
        t[p + "mlp.experts.gate_up_proj_bias"] = L.gate_up_bias.detach().to(bf)
        t[p + "mlp.experts.down_proj_bias"] = L.down_bias.detach().to(bf)
        for n, w in (("gate_up_proj", L.gate_up), ("down_proj", L.down)):
            wb = w.detach().to(bf)
            if mxfp4_rounding:
                codes, scales, _ = mxfp4.quantize(wb.cpu(), mxfp4_rounding)
                t[p + f"mlp.experts.{n}_blocks"] = mxfp4.pack(codes)
                t[p + f"mlp.experts.{n}_scales"] = scales.contiguous()
            else:
                t[p + f"mlp.experts.{n}"] = wb.transpose(1, 2).contiguous()
    return {k: v.cpu().contiguous() for k, v in t.items()}


def save_hf(m: GptOss, out: Path, mxfp4_rounding: str | None, tokenizer_dir: Path | None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    t = hf_tensors(m, mxfp4_rounding)
    save_file(dict(sorted(t.items())), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(m.c.hf_config(mxfp4_rounding is not None), indent=2) + "\n")
    gen = {"do_sample": False, "eos_token_id": m.c.eos_token_id, "pad_token_id": m.c.eos_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (out / f).write_bytes((tokenizer_dir / f).read_bytes())


def load_hf(d: Path, device="cpu") -> GptOss:
    """A checkpoint written by `save_hf` (MXFP4 experts dequantized, or dense) -> GptOss (float32)."""
    from safetensors.torch import load_file

    c = Config.from_hf(json.loads((d / "config.json").read_text()))
    m = GptOss(c)
    t = load_file(str(d / "model.safetensors"))
    with torch.no_grad():
        m.embed.weight.copy_(t["model.embed_tokens.weight"].float())
        m.norm.copy_(t["model.norm.weight"].float())
        if m.lm_head is not None:
            m.lm_head.copy_(t["lm_head.weight"].float())
        for i, L in enumerate(m.layers):
            p = f"model.layers.{i}."
            L.input_layernorm.copy_(t[p + "input_layernorm.weight"].float())
            L.post_attention_layernorm.copy_(t[p + "post_attention_layernorm.weight"].float())
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(L, n).weight.copy_(t[p + f"self_attn.{n}.weight"].float())
                getattr(L, n).bias.copy_(t[p + f"self_attn.{n}.bias"].float())
            L.sinks.copy_(t[p + "self_attn.sinks"].float())
            L.router.weight.copy_(t[p + "mlp.router.weight"].float())
            L.router.bias.copy_(t[p + "mlp.router.bias"].float())
            L.gate_up_bias.copy_(t[p + "mlp.experts.gate_up_proj_bias"].float())
            L.down_bias.copy_(t[p + "mlp.experts.down_proj_bias"].float())
            for n, w in (("gate_up_proj", L.gate_up), ("down_proj", L.down)):
                if p + f"mlp.experts.{n}_blocks" in t:
                    w.copy_(mxfp4.unpack_dequantize(t[p + f"mlp.experts.{n}_blocks"], t[p + f"mlp.experts.{n}_scales"]))
                else:
                    w.copy_(t[p + f"mlp.experts.{n}"].float().transpose(1, 2))
    return m.to(device)


def config_dict(c: Config) -> dict:
    return asdict(c)


def param_report(c: Config) -> dict:
    """Parameter counts and the MXFP4 checkpoint size (bytes) of a config."""
    H, V, L, E, I = c.hidden_size, c.vocab_size, c.num_hidden_layers, c.num_local_experts, c.intermediate_size
    nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attn = H * nh * hd * 2 + H * nkv * hd * 2 + nh * hd * 2 + nkv * hd * 2 + H + nh
    router = E * H + E
    expert_w = E * 3 * H * I
    expert_b = E * (2 * I + H)
    norms = 2 * H
    embed = V * H * (1 if c.tie_word_embeddings else 2)
    dense = L * (attn + router + expert_b + norms) + embed + H
    mx_bytes = L * (expert_w // 2 + expert_w // 32)
    active = L * (attn + router + c.num_experts_per_tok * 3 * H * I) + V * H
    return {"total_params": dense + L * expert_w, "expert_params": L * expert_w, "active_params_per_token": active,
            "mxfp4_checkpoint_bytes_approx": dense * 2 + mx_bytes, "bf16_checkpoint_bytes_approx": (dense + L * expert_w) * 2}
