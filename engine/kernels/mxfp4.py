"""MXFP4: blocks of 32 FP4 (e2m1) values sharing one E8M0 power-of-two scale.

Storage, as in the gpt-oss checkpoints: a weight row of `cols` values is `cols // 32` blocks of 16
bytes (two FP4 codes per byte, the even element in the low nibble) plus one uint8 scale per block,
meaning 2 ** (scale - 127). These are the plain-PyTorch decode and encode: the spec other kernels
follow and the tests' oracle.
"""

from __future__ import annotations

import torch

# The 16 FP4 e2m1 code points: sign bit 3, exponent bits 2-1, mantissa bit 0.
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
SCALE_BIAS = 127
BLOCK = 32
_FP4_MAX_EXPONENT = 2  # 6.0 = 1.5 * 2**2
# Midpoints between consecutive FP4 magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6): round to nearest.
_MAGNITUDE_EDGES = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """[..., rows, cols // 32, 16] uint8 + [..., rows, cols // 32] uint8 -> [..., rows, cols]."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            "expected blocks [..., n_blocks, 16] and scales [..., n_blocks]"
        )
    # float16's exponent range is far narrower than E8M0's: scale in float32, then round once.
    work = torch.float32 if dtype == torch.float16 else dtype
    lut = torch.tensor(FP4_VALUES, dtype=work, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).to(torch.int64)  # [..., nb, 16, 2]
    values = lut[codes].flatten(-3)  # [..., rows, cols]: low nibble first within each byte
    exponents = (scales.to(torch.int32) - SCALE_BIAS).repeat_interleave(BLOCK, dim=-1)
    return torch.ldexp(values, exponents.to(work)).to(dtype)


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., cols] float -> (blocks [..., cols // 32, 16] uint8, scales [..., cols // 32] uint8).

    The shared exponent is floor(log2(max |x|)) - 2, so the block's largest value lands in FP4's
    top binade; values round to the nearest FP4 code point and clamp at +-6.
    """
    if weight.shape[-1] % BLOCK:
        raise ValueError(f"MXFP4 needs a multiple of {BLOCK} columns, found {weight.shape[-1]}")
    x = weight.float().unflatten(-1, (-1, BLOCK))  # [..., nb, 32]
    amax = x.abs().amax(dim=-1)
    exponent = torch.where(
        amax > 0, torch.floor(torch.log2(amax.clamp_min(1e-38))) - _FP4_MAX_EXPONENT, 0.0
    ).clamp(-SCALE_BIAS, 254 - SCALE_BIAS)
    scaled = x / torch.exp2(exponent).unsqueeze(-1)
    edges = torch.tensor(_MAGNITUDE_EDGES, device=x.device)
    codes = torch.bucketize(scaled.abs(), edges)  # 0..7; a tie goes to the smaller magnitude
    codes = codes + 8 * (scaled < 0).to(codes.dtype)
    codes = codes.to(torch.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., nb, 16]
    scales = (exponent + SCALE_BIAS).to(torch.uint8)
    return packed.contiguous(), scales.contiguous()
