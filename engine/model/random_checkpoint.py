"""Deterministic random gpt-oss checkpoints, from tiny to the exact gpt-oss-20b and -120b shapes.

A library function and a CLI, used by tests and benchmarks:

    python -m engine.model.random_checkpoint --preset tiny --layout both --out /tmp/tiny

`write_random_checkpoint` writes a checkpoint in either layout that `engine.model.weights` (and
Hugging Face transformers, for the HF layout) load like a real one:

- "hf": `config.json` (`ModelConfig.to_hf_dict()`), shards `model-0000K-of-0000N.safetensors` of
  whole layers (the embedding first, the final norm and unembedding last) and
  `model.safetensors.index.json` with the `weight_map`, as Hugging Face writes them;
- "original": `config.json` (`ModelConfig.to_original_dict()`) and one `model.safetensors`;
- "both": the HF files at the root and the original layout in `original/`, like a Hugging Face
  repo of gpt-oss, with the same weights: the original `qkv` is the row-wise concatenation of the
  HF `q_proj`, `k_proj`, `v_proj`; every other tensor holds the same bytes.

Dense tensors (norm scales and sinks included, as in the real checkpoints) are stored in `dtype`,
expert weights as MXFP4 (uint8 blocks and E8M0 scales) with biases in `dtype`. Values: embedding
N(0, 1) (an RMSNorm follows it), every other matrix and bias N(0, 0.02), norm scales 1 + N(0, 0.1),
sinks N(0, 1); expert weights N(0, 0.02) quantized with `quantize_mxfp4`.

Deterministic: each tensor's values come from a `torch.Generator` seeded from (seed, tensor name)
and drawn in chunks whose bounds depend on the shape only, so the same (config, seed, dtype,
layout) gives byte-identical files whatever the write order, and both layouts share values.

Big shapes: nothing holds a whole checkpoint. Files are written by a streaming safetensors writer
(header first, then each tensor chunk by chunk), dense tensors are drawn in chunks of rows and
experts one at a time: writing gpt-oss-20b (13.8 GB) peaks at ~0.5 GB of RSS and takes under a
minute on 2 cores. Quantizing runs at ~10 M floats/s per core, which the ~19 G expert floats of
gpt-oss-20b (~115 G for -120b) would turn into an hour or more; so above `QUANTIZE_LIMIT` expert
floats (unless `quantize_experts=True`) expert weights are drawn directly as random MXFP4 instead:
uniformly random FP4 codes (random bytes) with scales 119 or 120 (2**-8, 2**-7), values of RMS
~0.018 like the quantized N(0, 0.02). They are valid MXFP4, just not the quantization of a
Gaussian. The tiny preset (and anything up to `QUANTIZE_LIMIT`) goes through `quantize_mxfp4`.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import itertools
import json
import logging
import math
import os
import re
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from engine.config import DTYPES, ModelConfig, preset
from engine.kernels.mxfp4 import BLOCK, quantize_mxfp4

log = logging.getLogger(__name__)

LAYOUTS = ("hf", "original", "both")
PRESETS = ("tiny", "gpt-oss-20b", "gpt-oss-120b")
# Expert weights (floats over all layers) up to which experts are really quantized by default.
QUANTIZE_LIMIT = 1 << 27
DEFAULT_MAX_SHARD_BYTES = 2_000_000_000
EXPERT_STD = 0.02
# Random-code experts: uniform FP4 codes have RMS ~2.93; times 2**-8 or 2**-7 gives RMS ~0.018.
_RANDOM_CODE_SCALES = (119, 120)
_CHUNK_ELEMENTS = 1 << 24  # floats drawn at once for dense tensors (64 MiB as float32)
_ST_DTYPES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.uint8: "U8",
}
_HF_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


# --- values ----------------------------------------------------------------------------------------


def _generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded from (seed, tensor name) alone: values never depend on write order."""
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _normal(
    key: str, shape: tuple[int, ...], *, mean: float = 0.0, std: float = 0.02
) -> Callable[[int, torch.dtype], Iterator[torch.Tensor]]:
    """mean + std * N(0, 1) of `shape`, drawn in float32 in chunks of whole rows."""

    def chunks(seed: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        g = _generator(seed, key)
        rows, row_shape = shape[0], shape[1:]
        step = max(1, _CHUNK_ELEMENTS // max(1, math.prod(row_shape)))
        for start in range(0, rows, step):
            x = torch.randn((min(step, rows - start), *row_shape), generator=g)
            x.mul_(std).add_(mean)
            yield x.to(dtype)

    return chunks


def _concat(
    *parts: Callable[[int, torch.dtype], Iterator[torch.Tensor]],
) -> Callable[[int, torch.dtype], Iterator[torch.Tensor]]:
    """The row-wise concatenation of `parts` (the original layout's fused qkv)."""

    def chunks(seed: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        return itertools.chain.from_iterable(part(seed, dtype) for part in parts)

    return chunks


class _Experts:
    """One layer's expert weight W [E, rows, cols] as MXFP4, produced one expert at a time.

    The blocks tensor is written expert by expert; its scales (1/16 of its bytes) are kept for the
    scales tensor, written after it.
    """

    def __init__(self, key: str, num_experts: int, rows: int, cols: int, quantize: bool) -> None:
        self.key, self.num_experts, self.rows, self.cols = key, num_experts, rows, cols
        self.quantize = quantize
        self._scales: list[torch.Tensor] | None = None

    @property
    def blocks_shape(self) -> tuple[int, ...]:
        return (self.num_experts, self.rows, self.cols // BLOCK, BLOCK // 2)

    @property
    def scales_shape(self) -> tuple[int, ...]:
        return (self.num_experts, self.rows, self.cols // BLOCK)

    def blocks(self, seed: int, _dtype: torch.dtype) -> Iterator[torch.Tensor]:
        g = _generator(seed, self.key)
        scales: list[torch.Tensor] = []
        for _ in range(self.num_experts):
            if self.quantize:
                weight = torch.randn((self.rows, self.cols), generator=g).mul_(EXPERT_STD)
                blocks, expert_scales = quantize_mxfp4(weight)
                del weight
            else:
                n_bytes = self.rows * self.cols // 2
                words = torch.empty(n_bytes // 8, dtype=torch.int64).random_(
                    -(2**63), None, generator=g
                )
                blocks = words.view(torch.uint8).view(self.blocks_shape[1:])
                low, high = _RANDOM_CODE_SCALES
                expert_scales = torch.randint(
                    low, high + 1, self.scales_shape[1:], generator=g, dtype=torch.uint8
                )
            scales.append(expert_scales)
            yield blocks.unsqueeze(0)
        self._scales = scales

    def scales(self, seed: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
        if self._scales is None:  # the blocks were not written first: draw them again
            for _ in self.blocks(seed, dtype):
                pass
        scales, self._scales = self._scales or [], None
        yield torch.stack(scales)


# --- the tensors of each layout --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Item:
    """One tensor of a file: its name there, dtype, shape and how to draw its values."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[int, torch.dtype], Iterator[torch.Tensor]]
    unit: str  # 'embedding', 'layer N' or 'final': for shards and progress logs

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _units(
    c: ModelConfig, layout: str, dtype: torch.dtype, quantize: bool
) -> list[tuple[str, list[_Item]]]:
    """The checkpoint as units (embedding, each layer, final norm and unembedding), in order.

    Values are keyed by the Hugging Face names, so both layouts hold the same ones.
    """
    hf = layout == "hf"
    h, v, e, inter = c.hidden_size, c.vocab_size, c.num_experts, c.intermediate_size
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    norm, small, unit_normal = (1.0, 0.1), (0.0, 0.02), (0.0, 1.0)  # (mean, std)

    def dense(
        unit: str, hf_name: str, orig_name: str, shape: tuple[int, ...], dist: tuple[float, float]
    ) -> _Item:
        mean, std = dist
        values = _normal(hf_name, shape, mean=mean, std=std)
        return _Item(hf_name if hf else orig_name, dtype, shape, values, unit)

    units = [
        ("embedding", [
            dense("embedding", "model.embed_tokens.weight", "embedding.weight", (v, h), unit_normal)
        ])
    ]  # fmt: skip
    for i in range(c.num_layers):
        unit, p, o = f"layer {i}", f"model.layers.{i}.", f"block.{i}."
        if hf:
            items = [
                dense(unit, f"{p}self_attn.{x}_proj.{kind}", "", shape, small)
                for x, rows in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))
                for kind, shape in (("weight", (rows, h)), ("bias", (rows,)))
            ]
        else:
            qkv = q_dim + 2 * kv_dim
            parts = {
                kind: [
                    _normal(f"{p}self_attn.{x}_proj.{kind}", (rows, *tail), std=small[1])
                    for x, rows in (("q", q_dim), ("k", kv_dim), ("v", kv_dim))
                ]
                for kind, tail in (("weight", (h,)), ("bias", ()))
            }
            items = [
                _Item(o + "attn.qkv.weight", dtype, (qkv, h), _concat(*parts["weight"]), unit),
                _Item(o + "attn.qkv.bias", dtype, (qkv,), _concat(*parts["bias"]), unit),
            ]
        items += [
            dense(unit, p + "input_layernorm.weight", o + "attn.norm.scale", (h,), norm),
            dense(unit, p + "self_attn.sinks", o + "attn.sinks", (c.num_attention_heads,), unit_normal),
            dense(unit, p + "self_attn.o_proj.weight", o + "attn.out.weight", (h, q_dim), small),
            dense(unit, p + "self_attn.o_proj.bias", o + "attn.out.bias", (h,), small),
            dense(unit, p + "post_attention_layernorm.weight", o + "mlp.norm.scale", (h,), norm),
            dense(unit, p + "mlp.router.weight", o + "mlp.gate.weight", (e, h), small),
            dense(unit, p + "mlp.router.bias", o + "mlp.gate.bias", (e,), small),
            dense(unit, p + "mlp.experts.gate_up_proj_bias", o + "mlp.mlp1_bias", (e, 2 * inter), small),
            dense(unit, p + "mlp.experts.down_proj_bias", o + "mlp.mlp2_bias", (e, h), small),
        ]  # fmt: skip
        for hf_name, orig_name, rows, cols in (
            (p + "mlp.experts.gate_up_proj", o + "mlp.mlp1_weight", 2 * inter, h),
            (p + "mlp.experts.down_proj", o + "mlp.mlp2_weight", h, inter),
        ):
            experts = _Experts(hf_name, e, rows, cols, quantize)
            blocks, scales = (
                (hf_name + "_blocks", hf_name + "_scales")
                if hf
                else (orig_name + ".blocks", orig_name + ".scales")
            )
            items.append(_Item(blocks, torch.uint8, experts.blocks_shape, experts.blocks, unit))
            items.append(_Item(scales, torch.uint8, experts.scales_shape, experts.scales, unit))
        units.append((unit, items))
    units.append(("final", [
        dense("final", "model.norm.weight", "norm.scale", (h,), norm),
        dense("final", "lm_head.weight", "unembedding.weight", (v, h), small),
    ]))  # fmt: skip
    return units


# --- a streaming safetensors writer ----------------------------------------------------------------


def _data_order(items: Sequence[_Item]) -> list[_Item]:
    """Dense tensors first, uint8 last (stable), so every tensor starts aligned to its dtype."""
    return sorted(items, key=lambda item: -item.dtype.itemsize)


def _write_chunk(f: BinaryIO, chunk: torch.Tensor) -> int:
    chunk = chunk.contiguous()
    n_bytes = chunk.numel() * chunk.element_size()
    if n_bytes:
        f.write((ctypes.c_ubyte * n_bytes).from_address(chunk.data_ptr()))
    return n_bytes


def _write_safetensors(
    path: Path, items: Sequence[_Item], seed: int, dtype: torch.dtype, started: float
) -> int:
    """Write `items` (already in data order) as one safetensors file, chunk by chunk.

    Format: 8-byte little-endian header length, the JSON header {name: {dtype, shape,
    data_offsets}} padded with spaces to a multiple of 8, then the tensors' bytes back to back.
    The file appears under its name only once complete. Returns its size.
    """
    if sys.byteorder != "little":
        raise RuntimeError(
            "safetensors files are little-endian; this writer needs a little-endian host"
        )
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for item in items:
        header[item.name] = {
            "dtype": _ST_DTYPES[item.dtype],
            "shape": list(item.shape),
            "data_offsets": [offset, offset + item.nbytes],
        }
        offset += item.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    last_of_unit = {item.unit: item.name for item in items}
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for item in items:
            written = 0
            for chunk in item.chunks(seed, dtype):
                if chunk.dtype != item.dtype:
                    raise AssertionError(f"{item.name}: drew {chunk.dtype}, declared {item.dtype}")
                written += _write_chunk(f, chunk)
            if written != item.nbytes:
                raise AssertionError(f"{item.name}: wrote {written} bytes, declared {item.nbytes}")
            if last_of_unit[item.unit] == item.name and item.unit.startswith("layer"):
                log.info(
                    "%s: %s written (%.1fs)", path.name, item.unit, time.perf_counter() - started
                )
    os.replace(partial, path)
    return 8 + len(raw) + offset


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_hf(
    directory: Path,
    config: ModelConfig,
    units: list[tuple[str, list[_Item]]],
    seed: int,
    dtype: torch.dtype,
    max_shard_bytes: int,
    started: float,
) -> list[Path]:
    shards: list[list[_Item]] = []
    shard_bytes = 0
    for _, items in units:
        unit_bytes = sum(item.nbytes for item in items)
        if not shards or shard_bytes + unit_bytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].extend(items)
        shard_bytes += unit_bytes
    names = [f"model-{k:05d}-of-{len(shards):05d}.safetensors" for k in range(1, len(shards) + 1)]
    _remove_stale(directory, keep=names)
    (directory / "model.safetensors").unlink(missing_ok=True)
    hf_config = config.to_hf_dict() | {"torch_dtype": str(dtype).removeprefix("torch.")}
    _write_json(directory / "config.json", hf_config)
    weight_map: dict[str, str] = {}
    paths = []
    for name, items in zip(names, shards, strict=True):
        path = directory / name
        size = _write_safetensors(path, _data_order(items), seed, dtype, started)
        log.info("wrote %s (%.2f GB)", path, size / 1e9)
        weight_map.update(dict.fromkeys((item.name for item in items), name))
        paths.append(path)
    index = {
        "metadata": {"total_size": sum(item.nbytes for shard in shards for item in shard)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    _write_json(directory / "model.safetensors.index.json", index)
    return paths


def _remove_stale(directory: Path, keep: Sequence[str] = ()) -> None:
    """Remove the HF shards (and index) of an earlier checkpoint written into `directory`."""
    for stale in directory.glob("model-*-of-*.safetensors"):
        if _HF_SHARD.fullmatch(stale.name) and stale.name not in keep:
            log.warning("removing %s, a shard of an earlier checkpoint", stale)
            stale.unlink()
    if not keep:
        (directory / "model.safetensors.index.json").unlink(missing_ok=True)


def _write_original(
    directory: Path,
    config: ModelConfig,
    units: list[tuple[str, list[_Item]]],
    seed: int,
    dtype: torch.dtype,
    started: float,
) -> Path:
    _remove_stale(directory)
    _write_json(directory / "config.json", config.to_original_dict())
    path = directory / "model.safetensors"
    items = _data_order([item for _, unit_items in units for item in unit_items])
    size = _write_safetensors(path, items, seed, dtype, started)
    log.info("wrote %s (%.2f GB)", path, size / 1e9)
    return path


def expert_floats(config: ModelConfig) -> int:
    """How many expert weights (floats before quantization) the whole model has."""
    per_expert = 3 * config.intermediate_size * config.hidden_size
    return config.num_layers * config.num_experts * per_expert


def write_random_checkpoint(
    directory: str | Path,
    config: ModelConfig,
    *,
    layout: str = "hf",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    quantize_experts: bool | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a deterministic random checkpoint of `config` into `directory`; returns it.

    layout: "hf", "original" or "both" (HF at the root, original in `original/`, same weights).
    quantize_experts: quantize N(0, 0.02) expert weights with `quantize_mxfp4` (True) or draw
    random MXFP4 codes (False); None quantizes up to `QUANTIZE_LIMIT` expert floats.
    max_shard_bytes: HF shards hold whole layers and grow up to this size (one layer at least).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dense dtype must be bfloat16, float16 or float32, not {dtype}")
    if quantize_experts is None:
        quantize_experts = expert_floats(config) <= QUANTIZE_LIMIT
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log.info(
        "writing a random %s checkpoint (%d layers, %d experts, hidden %d, seed %d, %s, experts %s) "
        "to %s",
        layout, config.num_layers, config.num_experts, config.hidden_size, seed,
        str(dtype).removeprefix("torch."), "quantized" if quantize_experts else "random MXFP4 codes",
        directory,
    )  # fmt: skip
    if layout in ("hf", "both"):
        units = _units(config, "hf", dtype, quantize_experts)
        _write_hf(directory, config, units, seed, dtype, max_shard_bytes, started)
    if layout in ("original", "both"):
        target = directory / "original" if layout == "both" else directory
        target.mkdir(exist_ok=True)
        units = _units(config, "original", dtype, quantize_experts)
        _write_original(target, config, units, seed, dtype, started)
    total = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())
    log.info("wrote %s: %.2f GB in %.1fs", directory, total / 1e9, time.perf_counter() - started)
    return directory


# --- CLI -------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine.model.random_checkpoint",
        description="Write a deterministic random gpt-oss checkpoint (for tests and benchmarks).",
    )
    parser.add_argument("--preset", required=True, choices=PRESETS, help="model shape")
    parser.add_argument("--layout", default="hf", choices=LAYOUTS, help="checkpoint layout")
    parser.add_argument("--out", required=True, type=Path, help="directory to write into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="dense dtype")
    parser.add_argument(
        "--experts",
        default="auto",
        choices=("auto", "quantize", "random-codes"),
        help="quantize N(0, 0.02) expert weights, or draw random MXFP4 codes (fast); "
        f"auto quantizes up to {QUANTIZE_LIMIT} expert floats",
    )
    parser.add_argument(
        "--max-shard-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 1e9,
        help="largest HF shard (whole layers; one layer at least)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    quantize = {"auto": None, "quantize": True, "random-codes": False}[args.experts]
    write_random_checkpoint(
        args.out,
        preset(args.preset),
        layout=args.layout,
        seed=args.seed,
        dtype=DTYPES[args.dtype],
        quantize_experts=quantize,
        max_shard_bytes=int(args.max_shard_gb * 1e9),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
