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


_PAIR_LUTS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _pair_lut(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Byte -> its two FP4 values (low nibble first), packed in one integer of twice the width,
    so decoding is a single gather per byte rather than one per nibble."""
    key = (dtype, device)
    if key not in _PAIR_LUTS:
        pairs = [(FP4_VALUES[b & 0x0F], FP4_VALUES[b >> 4]) for b in range(256)]
        packed_as = torch.int32 if dtype.itemsize == 2 else torch.int64
        _PAIR_LUTS[key] = (
            torch.tensor(pairs, dtype=dtype, device=device).view(packed_as).squeeze(-1)
        )
    return _PAIR_LUTS[key]


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """[..., rows, cols // 32, 16] uint8 + [..., rows, cols // 32] uint8 -> [..., rows, cols].

    Exact: an FP4 value times a power of two is representable in bf16 and float32 over E8M0's whole
    range (subnormals included); float16's range is far narrower, so it is scaled in float32 and
    rounded once.
    """
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            "expected blocks [..., n_blocks, 16] and scales [..., n_blocks]"
        )
    work = torch.float32 if dtype == torch.float16 else dtype
    values = _pair_lut(work, blocks.device)[blocks.int()].view(work)  # [..., nb, 32]
    factors = torch.exp2(scales.float() - SCALE_BIAS).to(work).unsqueeze(-1)  # exact powers of two
    return (values * factors).flatten(-2).to(dtype)


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
