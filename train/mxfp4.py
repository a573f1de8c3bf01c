"""MXFP4 quantization in PyTorch, bit-exact with the repo's `fp4` crate (crates/fp4/src/quant.rs).

OCP Microscaling: blocks of 32 values along the reduction axis K, E2M1 elements, one E8M0 scale per block.

* amax = max |v| of the block;
* shared exponent s (scale 2^s, stored as the byte s + 127), clamped to [-127, 127]; with amax = 1.f x 2^e:
  - "floor" (OCP v1.0, the fp4 crate's default `ScaleRounding::Floor`): s = e - 2 (the largest elements may
    saturate at 6);
  - "up" (`ScaleRounding::Up`, `ultra quantize`'s default): s = e - 2 if 1.f <= 1.5 else e - 1 (never clips);
  an all-zero block gets scale byte 0;
* element: |v| * 2^-s rounded to the nearest of {0, .5, 1, 1.5, 2, 3, 4, 6}, ties to the even code
  (thresholds 0.25 < , >= 0.75, > 1.25, >= 1.75, > 2.5, >= 3.5, > 5), saturating at 6; the sign bit is
  always kept (code | 8 for negative values, -0.0 included);
* packing (gpt-oss order): byte j of a block = code[2j] | code[2j + 1] << 4.

`fake_quant` is the QAT forward (dequantized values, straight-through gradient).  Everything here is
float32 bit arithmetic (frexp, powers of two built from bits), so it is exact on CPU and GPU alike.
"""

from __future__ import annotations

import torch

BLOCK = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
ROUNDINGS = ("floor", "up")


def _shared_exponent(amax: torch.Tensor, rounding: str) -> torch.Tensor:
    """amax [...] float32 >= 0 -> s [...] int32 (all-zero blocks: -127)."""
    mant, exp = torch.frexp(amax)  # amax = mant * 2^exp, mant in [0.5, 1)
    e = exp.to(torch.int32) - 1  # amax = (2 mant) * 2^e, 2 mant in [1, 2)
    if rounding == "floor":
        s = e - 2
    elif rounding == "up":
        s = torch.where(mant * 2 <= 1.5, e - 2, e - 1)
    else:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    s = s.clamp(-127, 127)
    return torch.where(amax == 0, torch.full_like(s, -127), s)


def _pow2(s: torch.Tensor) -> torch.Tensor:
    """2^s as float32, exactly, for integer s in [-127, 127] (bit construction, no pow/exp2)."""
    s = s.to(torch.int32)
    normal = ((s + 127).clamp(min=1) << 23).view(torch.float32)
    sub = torch.full_like(normal, 2.0 ** -127)  # 0x00400000, the only subnormal needed
    return torch.where(s >= -126, normal, sub)


def _codes(a: torch.Tensor) -> torch.Tensor:
    """|v| / 2^s (>= 0) -> E2M1 magnitude code 0..7 (nearest, ties to even code, saturating)."""
    return ((a > 0.25).to(torch.int32) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
            + (a > 2.5) + (a >= 3.5) + (a > 5.0))


def quantize(w: torch.Tensor, rounding: str = "floor") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., K] (any float dtype; quantized as float32) -> (codes uint8 [..., K] with sign bit 8,
    scale bytes uint8 [..., K/32], dequantized float32 [..., K])."""
    if w.shape[-1] % BLOCK:
        raise ValueError(f"K = {w.shape[-1]} is not a multiple of {BLOCK}")
    x = w.float()
    if not torch.isfinite(x).all():
        raise ValueError("non-finite value in a tensor to quantize")
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // BLOCK, BLOCK)
    amax = xb.abs().amax(-1)
    s = _shared_exponent(amax, rounding)
    a = xb.abs() * _pow2(-s).unsqueeze(-1)
    mag = _codes(a)
    table = torch.tensor(E2M1, dtype=torch.float32, device=x.device)
    deq = table[mag] * _pow2(s).unsqueeze(-1)
    neg = torch.signbit(xb)
    deq = torch.where(neg, -deq, deq)
    codes = (mag + neg.to(torch.int32) * 8).to(torch.uint8)
    scales = torch.where(amax == 0, torch.zeros_like(s), s + 127).to(torch.uint8)
    return codes.reshape(x.shape), scales, deq.reshape(x.shape)


def dequantize_values(w: torch.Tensor, rounding: str = "floor") -> torch.Tensor:
    """The MXFP4 value of every element of w (float32, no gradient)."""
    with torch.no_grad():
        return quantize(w, rounding)[2]


class _FakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, rounding):
        # The checkpoint stores bf16 weights for `ultra quantize`; quantize exactly what it would read.
        return quantize(w.detach().to(torch.bfloat16), rounding)[2].to(w.dtype)

    @staticmethod
    def backward(ctx, g):
        return g, None  # straight-through estimator


def fake_quant(w: torch.Tensor, rounding: str = "floor") -> torch.Tensor:
    """QAT forward: the MXFP4 value of bf16(w) along the last axis, gradient passed straight through."""
    return _FakeQuant.apply(w, rounding)


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [..., K] -> gpt-oss blocks uint8 [..., K/32, 16] (byte j = c[2j] | c[2j+1] << 4)."""
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // BLOCK, BLOCK // 2, 2)
    return (c[..., 0] | (c[..., 1] << 4)).to(torch.uint8).contiguous()


def unpack_dequantize(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """gpt-oss blocks [..., N, K/32, 16] + scales [..., N, K/32] -> float32 [..., N, K]."""
    lo = (blocks & 0x0F).long()
    hi = (blocks >> 4).long()
    codes = torch.stack([lo, hi], -1).reshape(*blocks.shape[:-1], BLOCK)
    table = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32, device=blocks.device)
    vals = table[codes]
    s = scales.to(torch.int32) - 127
    s = torch.where(scales == 0, torch.full_like(s, -127), s)
    out = vals * _pow2(s).unsqueeze(-1)
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * BLOCK)


def self_test() -> None:
    """Spot checks of the rules above (ties, saturation, signs, zero blocks, both scale rules)."""
    b = torch.zeros(2, 32)
    b[0, :8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.0])
    b[0, 8] = 4.0  # amax 4 -> floor: e = 2, s = 0
    codes, scales, deq = quantize(b, "floor")
    assert scales[0, 0] == 127 and scales[1, 0] == 0, scales
    assert codes[0, :8].tolist() == [0, 2, 2, 4, 4, 6, 6, 8], codes[0, :8]
    assert deq[0, :8].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 0.0]
    x = torch.zeros(1, 32)
    x[0, 0] = 7.0  # floor: e = 2, s = 0 -> 7 saturates to 6; up: 1.75 > 1.5 -> s = 1 -> 3.5 -> 4 -> 8
    assert quantize(x, "floor")[2][0, 0] == 6.0 and quantize(x, "up")[2][0, 0] == 8.0
    x[0, 0] = -6.0  # 1.5 <= 1.5 -> up: s = 0
    assert quantize(x, "up")[1][0, 0] == 127 and quantize(x, "up")[0][0, 0] == 15
    r = torch.randn(4, 64) * 3
    for rnd in ROUNDINGS:
        c, s, d = quantize(r, rnd)
        assert torch.equal(unpack_dequantize(pack(c), s), d)


if __name__ == "__main__":
    self_test()
    print("mxfp4 self-test ok")
