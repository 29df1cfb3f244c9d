"""gpt-oss weights from either checkpoint layout, memory-mapped, with MXFP4 experts kept packed.

Two layouts exist on users' disks:
- Hugging Face: `config.json` (`model_type: gpt_oss`) and `model*.safetensors` with names such as
  `model.layers.N.mlp.experts.gate_up_proj_blocks`;
- original: `original/config.json` and `original/model.safetensors` with names such as
  `block.N.mlp.mlp1_weight.blocks` (the layout the gpt-oss reference reads).
A Hugging Face repo root holds both; its HF files are used.

safetensors files are memory-mapped and tensors are views into the mapping: nothing is read until
used, and the page cache shares the bytes. Expert weights stay MXFP4 (uint8 blocks of 32 FP4 e2m1
values, two per byte, low nibble first, plus one uint8 E8M0 scale per block, bias 127); kernels
decode them. Dense weights are converted only when the compute dtype differs from the file's.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import CheckpointError, ModelConfig, read_json

_ST_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
}
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SafetensorsFile:
    """A memory-mapped safetensors file; `tensor(name)` is a zero-copy view into the mapping."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as f:
                size = path.stat().st_size
                if size < 8:
                    raise CheckpointError(
                        f"{path}: truncated ({size} bytes, no safetensors header)"
                    )
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > size - 8:
                    raise CheckpointError(
                        f"{path}: truncated (header of {header_len} bytes, file has {size})"
                    )
                header = json.loads(f.read(header_len))
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        except OSError as exc:
            raise CheckpointError(f"cannot open {path}: {exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a safetensors file ({exc})") from exc
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if not (
                isinstance(entry, dict)
                and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("shape"), list)
                and isinstance(entry.get("data_offsets"), list)
                and len(entry["data_offsets"]) == 2
            ):
                raise CheckpointError(
                    f"{path}: header entry for {name} needs dtype, shape and data_offsets, "
                    f"found {entry!r}"
                )
        self._entries: dict[str, dict] = header
        self._data_start = 8 + header_len
        self._size = size

    def names(self) -> list[str]:
        return list(self._entries)

    def tensor(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}; "
                f"expected one of {sorted(_ST_DTYPES)}"
            )
        begin, end = entry["data_offsets"]
        shape = entry["shape"]
        n_elements = 1
        for dim in shape:
            n_elements *= dim
        if end - begin != n_elements * dtype.itemsize:
            raise CheckpointError(
                f"{self.path}: tensor {name} of shape {shape} {entry['dtype']} needs "
                f"{n_elements * dtype.itemsize} bytes, its header says {end - begin}"
            )
        if self._data_start + end > self._size:
            raise CheckpointError(
                f"{self.path}: truncated: tensor {name} ends at byte {self._data_start + end}, "
                f"the file has {self._size}"
            )
        if n_elements == 0:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(
            self._mmap, dtype=dtype, count=n_elements, offset=self._data_start + begin
        )
        return flat.view(shape)


class TensorSource:
    """All tensors of one checkpoint (one or more safetensors files), by name."""

    def __init__(self, files: list[Path]) -> None:
        self.files = [SafetensorsFile(p) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.names():
                self._where[name] = f

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(
        self, name: str, shape: tuple[int, ...], kinds: tuple[torch.dtype, ...]
    ) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"checkpoint lacks tensor {name} (expected shape {list(shape)})")
        t = self._where[name].tensor(name)
        if tuple(t.shape) != shape:
            raise CheckpointError(
                f"tensor {name}: expected shape {list(shape)}, found {list(t.shape)}"
            )
        if t.dtype not in kinds:
            raise CheckpointError(
                f"tensor {name}: expected dtype {' or '.join(map(str, kinds))}, found {t.dtype}"
            )
        return t


# --- the canonical weight structure (what the model reads) -------------------------------------


@dataclass(slots=True)
class Mxfp4Experts:
    """Per-expert weights W[e] of shape [rows, cols] for `x @ W[e].T`, packed as MXFP4."""

    blocks: torch.Tensor  # uint8 [E, rows, cols // 32, 16]: 32 FP4 values, low nibble first
    scales: torch.Tensor  # uint8 [E, rows, cols // 32]: E8M0, value = 2 ** (scale - 127)
    bias: torch.Tensor  # [E, rows]


@dataclass(slots=True)
class AttentionWeights:
    norm: torch.Tensor  # float32 [H]
    q_weight: torch.Tensor  # [Hq * d, H]
    q_bias: torch.Tensor
    k_weight: torch.Tensor  # [Hkv * d, H]
    k_bias: torch.Tensor
    v_weight: torch.Tensor  # [Hkv * d, H]
    v_bias: torch.Tensor
    sinks: torch.Tensor  # float32 [Hq]: one learned logit per head that takes part in the softmax
    o_weight: torch.Tensor  # [H, Hq * d]
    o_bias: torch.Tensor


@dataclass(slots=True)
class MoEWeights:
    norm: torch.Tensor  # float32 [H]
    router_weight: torch.Tensor  # [E, H]
    router_bias: torch.Tensor  # [E]
    mlp1: Mxfp4Experts  # rows = 2 * I (gate and linear interleaved), cols = H
    mlp2: Mxfp4Experts  # rows = H, cols = I


@dataclass(slots=True)
class LayerWeights:
    attn: AttentionWeights
    moe: MoEWeights


@dataclass(slots=True)
class GptOssWeights:
    embedding: torch.Tensor  # [V, H]
    layers: list[LayerWeights]
    norm: torch.Tensor  # float32 [H]
    unembedding: torch.Tensor  # [V, H]


# --- layouts --------------------------------------------------------------------------------------


def detect_layout(directory: Path) -> str:
    """'hf' or 'original'; a Hugging Face repo root with both uses the HF files."""
    if not directory.is_dir():
        raise CheckpointError(f"model path {directory} is not a directory")
    config = directory / "config.json"
    if config.is_file() and read_json(config).get("model_type") == "gpt_oss":
        if _hf_files(directory):
            return "hf"
        raise CheckpointError(f"{directory} has a gpt_oss config.json but no model*.safetensors")
    if (directory / "original" / "config.json").is_file() or (
        config.is_file() and (directory / "model.safetensors").is_file()
    ):
        return "original"
    raise CheckpointError(
        f"{directory} holds no gpt-oss checkpoint: expected config.json (model_type gpt_oss) with "
        "model*.safetensors (Hugging Face layout), or original/config.json with "
        "original/model.safetensors (original layout)"
    )


def _hf_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names missing files: {missing}")
        return files
    return sorted(directory.glob("model*.safetensors"))


def _original_dir(directory: Path) -> Path:
    sub = directory / "original"
    return sub if (sub / "config.json").is_file() else directory


def load_config(directory: str | Path) -> tuple[ModelConfig, str]:
    directory = Path(directory)
    layout = detect_layout(directory)
    path = directory / "config.json" if layout == "hf" else _original_dir(directory) / "config.json"
    raw = read_json(path)
    parse = ModelConfig.from_hf_dict if layout == "hf" else ModelConfig.from_original_dict
    try:
        return parse(raw), layout
    except (TypeError, ValueError, AttributeError) as exc:
        if isinstance(exc, CheckpointError):
            raise CheckpointError(f"{path}: {exc}") from None
        raise CheckpointError(f"{path}: malformed gpt-oss config ({exc})") from exc


def load_weights(
    directory: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[ModelConfig, GptOssWeights]:
    """Read a checkpoint of either layout. Dense weights come in `dtype`; experts stay packed.

    `progress(done, total)` is called as each layer's weights reach `device` in `dtype`.
    """
    directory = Path(directory)
    config, layout = load_config(directory)
    if layout == "hf":
        source = TensorSource(_hf_files(directory))
        weights = _read(source, config, _HF_NAMES, fused_qkv=False)
    else:
        files = sorted(_original_dir(directory).glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{_original_dir(directory)} has no *.safetensors file")
        weights = _read(TensorSource(files), config, _ORIGINAL_NAMES, fused_qkv=True)
    return config, _to(weights, dtype, torch.device(device), progress)


_HF_NAMES = {
    "embedding": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "unembedding": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q_weight": "model.layers.{i}.self_attn.q_proj.weight",
    "q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_weight": "model.layers.{i}.self_attn.k_proj.weight",
    "k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_weight": "model.layers.{i}.self_attn.v_proj.weight",
    "v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "sinks": "model.layers.{i}.self_attn.sinks",
    "o_weight": "model.layers.{i}.self_attn.o_proj.weight",
    "o_bias": "model.layers.{i}.self_attn.o_proj.bias",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "router_weight": "model.layers.{i}.mlp.router.weight",
    "router_bias": "model.layers.{i}.mlp.router.bias",
    "mlp1_blocks": "model.layers.{i}.mlp.experts.gate_up_proj_blocks",
    "mlp1_scales": "model.layers.{i}.mlp.experts.gate_up_proj_scales",
    "mlp1_bias": "model.layers.{i}.mlp.experts.gate_up_proj_bias",
    "mlp2_blocks": "model.layers.{i}.mlp.experts.down_proj_blocks",
    "mlp2_scales": "model.layers.{i}.mlp.experts.down_proj_scales",
    "mlp2_bias": "model.layers.{i}.mlp.experts.down_proj_bias",
}

_ORIGINAL_NAMES = {
    "embedding": "embedding.weight",
    "norm": "norm.scale",
    "unembedding": "unembedding.weight",
    "attn_norm": "block.{i}.attn.norm.scale",
    "qkv_weight": "block.{i}.attn.qkv.weight",
    "qkv_bias": "block.{i}.attn.qkv.bias",
    "sinks": "block.{i}.attn.sinks",
    "o_weight": "block.{i}.attn.out.weight",
    "o_bias": "block.{i}.attn.out.bias",
    "mlp_norm": "block.{i}.mlp.norm.scale",
    "router_weight": "block.{i}.mlp.gate.weight",
    "router_bias": "block.{i}.mlp.gate.bias",
    "mlp1_blocks": "block.{i}.mlp.mlp1_weight.blocks",
    "mlp1_scales": "block.{i}.mlp.mlp1_weight.scales",
    "mlp1_bias": "block.{i}.mlp.mlp1_bias",
    "mlp2_blocks": "block.{i}.mlp.mlp2_weight.blocks",
    "mlp2_scales": "block.{i}.mlp.mlp2_weight.scales",
    "mlp2_bias": "block.{i}.mlp.mlp2_bias",
}


def _read(
    source: TensorSource, c: ModelConfig, names: dict[str, str], *, fused_qkv: bool
) -> GptOssWeights:
    h, v, e, inter, d = c.hidden_size, c.vocab_size, c.num_experts, c.intermediate_size, c.head_dim
    q_dim, kv_dim = c.num_attention_heads * d, c.num_key_value_heads * d
    dense = _FLOAT_DTYPES
    u8 = (torch.uint8,)

    def get(key: str, shape: tuple[int, ...], kinds=dense, i: int = 0) -> torch.Tensor:
        return source.get(names[key].format(i=i), shape, kinds)

    layers = []
    for i in range(c.num_layers):
        if fused_qkv:
            # The original layout fuses q, k, v row-wise in that order: slices are views.
            qkv_w = get("qkv_weight", (q_dim + 2 * kv_dim, h), i=i)
            qkv_b = get("qkv_bias", (q_dim + 2 * kv_dim,), i=i)
            q_w, k_w, v_w = qkv_w.split([q_dim, kv_dim, kv_dim])
            q_b, k_b, v_b = qkv_b.split([q_dim, kv_dim, kv_dim])
        else:
            q_w, q_b = get("q_weight", (q_dim, h), i=i), get("q_bias", (q_dim,), i=i)
            k_w, k_b = get("k_weight", (kv_dim, h), i=i), get("k_bias", (kv_dim,), i=i)
            v_w, v_b = get("v_weight", (kv_dim, h), i=i), get("v_bias", (kv_dim,), i=i)
        attn = AttentionWeights(
            norm=get("attn_norm", (h,), i=i),
            q_weight=q_w, q_bias=q_b, k_weight=k_w, k_bias=k_b, v_weight=v_w, v_bias=v_b,
            sinks=get("sinks", (c.num_attention_heads,), i=i),
            o_weight=get("o_weight", (h, q_dim), i=i),
            o_bias=get("o_bias", (h,), i=i),
        )  # fmt: skip
        moe = MoEWeights(
            norm=get("mlp_norm", (h,), i=i),
            router_weight=get("router_weight", (e, h), i=i),
            router_bias=get("router_bias", (e,), i=i),
            mlp1=Mxfp4Experts(
                blocks=get("mlp1_blocks", (e, 2 * inter, h // 32, 16), u8, i=i),
                scales=get("mlp1_scales", (e, 2 * inter, h // 32), u8, i=i),
                bias=get("mlp1_bias", (e, 2 * inter), i=i),
            ),
            mlp2=Mxfp4Experts(
                blocks=get("mlp2_blocks", (e, h, inter // 32, 16), u8, i=i),
                scales=get("mlp2_scales", (e, h, inter // 32), u8, i=i),
                bias=get("mlp2_bias", (e, h), i=i),
            ),
        )
        layers.append(LayerWeights(attn, moe))
    return GptOssWeights(
        embedding=get("embedding", (v, h)),
        layers=layers,
        norm=get("norm", (h,)),
        unembedding=get("unembedding", (v, h)),
    )


def _to(
    w: GptOssWeights,
    dtype: torch.dtype,
    device: torch.device,
    progress: Callable[[int, int], None] | None = None,
) -> GptOssWeights:
    """Dense weights to `dtype` (no copy when already so), norms and sinks to float32."""

    def dense(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    def f32(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=torch.float32)

    def experts(x: Mxfp4Experts) -> Mxfp4Experts:
        return Mxfp4Experts(x.blocks.to(device), x.scales.to(device), dense(x.bias))

    layers = []
    for layer in w.layers:
        a, m = layer.attn, layer.moe
        attn = AttentionWeights(
            norm=f32(a.norm),
            q_weight=dense(a.q_weight), q_bias=dense(a.q_bias),
            k_weight=dense(a.k_weight), k_bias=dense(a.k_bias),
            v_weight=dense(a.v_weight), v_bias=dense(a.v_bias),
            sinks=f32(a.sinks), o_weight=dense(a.o_weight), o_bias=dense(a.o_bias),
        )  # fmt: skip
        moe = MoEWeights(
            norm=f32(m.norm),
            router_weight=dense(m.router_weight),
            router_bias=dense(m.router_bias),
            mlp1=experts(m.mlp1),
            mlp2=experts(m.mlp2),
        )
        layers.append(LayerWeights(attn, moe))
        if progress is not None:
            progress(len(layers), len(w.layers))
    return GptOssWeights(dense(w.embedding), layers, f32(w.norm), dense(w.unembedding))
