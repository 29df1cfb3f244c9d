"""The kernel interface: every hot op of the forward pass, and the one place that picks a backend.

`reference` (plain PyTorch, `reference.py`) is the specification and the oracle; faster CPU and GPU
backends plug in here with the same signatures and are tested against it.

`cpu` (`cpu.py`, C++ in `csrc/`) fuses the MXFP4 experts, streams the bf16 matmuls of decode
steps, and does RMSNorm, RoPE and attention over the paged cache in one call each; RoPE's tables
stay the reference's. It is compiled on first
use; where that is impossible (no compiler) `auto` falls back to `reference`, and `cpu.load` has
logged why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kernels import cpu, reference


@dataclass(frozen=True, slots=True)
class Kernels:
    name: str
    linear: Callable[..., torch.Tensor]  # F.linear's signature: the dense (bf16) matmuls
    linear_many: Callable[..., tuple[torch.Tensor, ...]]  # one input, several weights (q, k, v)
    rms_norm: Callable[..., torch.Tensor]
    rope_cos_sin: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    apply_rope: Callable[..., torch.Tensor]
    paged_attention: Callable[..., torch.Tensor]
    moe: Callable[..., torch.Tensor]


REFERENCE = Kernels(
    name="reference",
    linear=F.linear,
    linear_many=reference.linear_many,
    rms_norm=reference.rms_norm,
    rope_cos_sin=reference.rope_cos_sin,
    apply_rope=reference.apply_rope,
    paged_attention=reference.paged_attention,
    moe=reference.moe,
)


def cpu_kernels(isa: str = "auto") -> Kernels:
    """The fused CPU kernels on one instruction set (`auto`: the best this CPU has; tests force
    each of `cpu.supported_isas()`). Raises RuntimeError when they cannot be built."""
    if not cpu.load():
        raise RuntimeError("the fused CPU kernels could not be built (the log says why)")
    name = cpu.best_isa() if isa == "auto" else isa
    if name not in cpu.supported_isas():
        raise ValueError(f"ISA {name!r} is not supported here: {cpu.supported_isas()}")
    return Kernels(
        name=f"cpu-{name}",
        linear=cpu.linear,
        linear_many=cpu.linear_many,
        rms_norm=cpu.rms_norm,
        rope_cos_sin=reference.rope_cos_sin,
        apply_rope=cpu.apply_rope,
        paged_attention=cpu.paged_attention,
        moe=functools.partial(cpu.moe, isa=name),
    )


def select_kernels(backend: str = "auto", device: torch.device | str = "cpu") -> Kernels:
    """The kernels for a device: `auto` picks the fastest backend available there."""
    on_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        if on_cpu and cpu.load():
            return cpu_kernels()
        return REFERENCE
    if backend == "reference":
        return REFERENCE
    if backend == "cpu":
        if not on_cpu:
            raise ValueError(f"the cpu kernel backend runs on the CPU, not on {device}")
        return cpu_kernels()
    raise ValueError(f"unknown kernel backend {backend!r}; available: auto, cpu, reference")
