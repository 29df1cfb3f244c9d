"""The kernel interface: every hot op of the forward pass, and the one place that picks a backend.

`reference` (plain PyTorch, `reference.py`) is the specification and the oracle; faster CPU and GPU
backends plug in here with the same signatures and are tested against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kernels import reference


@dataclass(frozen=True, slots=True)
class Kernels:
    name: str
    rms_norm: Callable[..., torch.Tensor]
    rope_cos_sin: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    apply_rope: Callable[..., torch.Tensor]
    paged_attention: Callable[..., torch.Tensor]
    moe: Callable[..., torch.Tensor]


REFERENCE = Kernels(
    name="reference",
    rms_norm=reference.rms_norm,
    rope_cos_sin=reference.rope_cos_sin,
    apply_rope=reference.apply_rope,
    paged_attention=reference.paged_attention,
    moe=reference.moe,
)

_BACKENDS = {"reference": REFERENCE}


def select_kernels(backend: str = "auto", device: torch.device | str = "cpu") -> Kernels:
    """The kernels for a device: `auto` picks the fastest backend available there."""
    if backend == "auto":
        return REFERENCE  # the only backend so far; CPU and GPU kernels register here
    try:
        return _BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"unknown kernel backend {backend!r}; available: auto, {', '.join(sorted(_BACKENDS))}"
        ) from None
