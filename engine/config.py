"""Typed, frozen configuration of the engine: the model's architecture and the cache layout.

`ModelConfig` is read from either checkpoint layout's `config.json` (Hugging Face `model_type:
gpt_oss`, or the original `original/config.json`) and carries every number the architecture needs,
so nothing downstream hard-codes gpt-oss-20b or -120b.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SLIDING = "sliding_attention"
FULL = "full_attention"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: says what was expected and what was found."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    num_layers: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    num_attention_heads: int
    num_key_value_heads: int
    sliding_window: int
    # Per layer: SLIDING or FULL (gpt-oss alternates, layer 0 sliding).
    layer_types: tuple[str, ...]
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0  # YaRN beta_slow: where interpolation ends (high frequencies kept)
    rope_ntk_beta: float = 32.0  # YaRN beta_fast
    initial_context_length: int = 4096
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self) -> None:
        if len(self.layer_types) != self.num_layers:
            raise CheckpointError(
                f"config: {self.num_layers} layers but {len(self.layer_types)} layer_types"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise CheckpointError(
                f"config: unknown layer types {bad}; expected {SLIDING!r}/{FULL!r}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"config: {self.num_attention_heads} query heads do not group over "
                f"{self.num_key_value_heads} KV heads"
            )
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise CheckpointError(f"config: {name} must be a multiple of 32 for MXFP4 blocks")
        if not 0 < self.experts_per_token <= self.num_experts:
            raise CheckpointError(
                f"config: experts_per_token {self.experts_per_token} not in 1..{self.num_experts}"
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    # --- from config.json files -----------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """A Hugging Face `config.json` (`model_type: gpt_oss`)."""
        rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
        if rope and rope.get("rope_type", rope.get("type", "yarn")) != "yarn":
            raise CheckpointError(f"config: expected YaRN rope scaling, found {rope!r}")
        n_layers = _require(raw, "num_hidden_layers", int)
        layer_types = raw.get("layer_types") or _alternating(n_layers)
        return cls(
            num_layers=n_layers,
            num_experts=_require(raw, "num_local_experts", int),
            experts_per_token=int(raw.get("num_experts_per_tok", raw.get("experts_per_token", 4))),
            vocab_size=_require(raw, "vocab_size", int),
            hidden_size=_require(raw, "hidden_size", int),
            intermediate_size=_require(raw, "intermediate_size", int),
            head_dim=int(raw.get("head_dim", 64)),
            num_attention_heads=_require(raw, "num_attention_heads", int),
            num_key_value_heads=_require(raw, "num_key_value_heads", int),
            sliding_window=int(raw.get("sliding_window") or 128),
            layer_types=tuple(layer_types),
            rope_theta=float(raw.get("rope_theta", rope.get("rope_theta", 150000.0))),
            rope_scaling_factor=float(rope.get("factor", 32.0)),
            rope_ntk_alpha=float(rope.get("beta_slow", 1.0)),
            rope_ntk_beta=float(rope.get("beta_fast", 32.0)),
            initial_context_length=int(rope.get("original_max_position_embeddings", 4096)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        )

    @classmethod
    def from_original_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """The original layout's `config.json` (as read by the gpt-oss reference)."""
        n_layers = _require(raw, "num_hidden_layers", int)
        initial = int(raw.get("initial_context_length", 4096))
        factor = float(raw.get("rope_scaling_factor", 32.0))
        return cls(
            num_layers=n_layers,
            num_experts=_require(raw, "num_experts", int),
            experts_per_token=int(raw.get("experts_per_token", 4)),
            vocab_size=_require(raw, "vocab_size", int),
            hidden_size=_require(raw, "hidden_size", int),
            intermediate_size=_require(raw, "intermediate_size", int),
            head_dim=int(raw.get("head_dim", 64)),
            num_attention_heads=_require(raw, "num_attention_heads", int),
            num_key_value_heads=_require(raw, "num_key_value_heads", int),
            sliding_window=int(raw.get("sliding_window", 128)),
            layer_types=tuple(_alternating(n_layers)),
            rope_theta=float(raw.get("rope_theta", 150000.0)),
            rope_scaling_factor=factor,
            rope_ntk_alpha=float(raw.get("rope_ntk_alpha", 1.0)),
            rope_ntk_beta=float(raw.get("rope_ntk_beta", 32.0)),
            initial_context_length=initial,
            max_position_embeddings=int(raw.get("max_position_embeddings", int(initial * factor))),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The Hugging Face `config.json` of this architecture (as the real checkpoints ship it)."""
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initial_context_length": self.initial_context_length,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_experts,
            "quantization_config": {
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
                "quant_method": "mxfp4",
            },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": {
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "factor": self.rope_scaling_factor,
                "original_max_position_embeddings": self.initial_context_length,
                "rope_type": "yarn",
                "truncate": False,
            },
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": False,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }

    def to_original_dict(self) -> dict[str, Any]:
        return {
            "num_hidden_layers": self.num_layers,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": self.rope_scaling_factor,
            "rope_ntk_alpha": self.rope_ntk_alpha,
            "rope_ntk_beta": self.rope_ntk_beta,
        }


def _alternating(n_layers: int) -> list[str]:
    # gpt-oss: sliding window on even layers (layer 0 is a sliding layer), full attention on odd.
    return [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]


def _require(raw: dict[str, Any], key: str, kind: type) -> Any:
    if key not in raw:
        raise CheckpointError(f"config.json lacks {key!r}")
    try:
        return kind(raw[key])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"config.json: {key!r} should be {kind.__name__}, found {raw[key]!r}"
        ) from exc


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def preset(name: str) -> ModelConfig:
    """`tiny`, `gpt-oss-20b` or `gpt-oss-120b` as a ModelConfig."""
    if name == "tiny":
        return ModelConfig(
            num_layers=2, num_experts=4, experts_per_token=2, vocab_size=512, hidden_size=64,
            intermediate_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
            sliding_window=128, layer_types=tuple(_alternating(2)),
        )  # fmt: skip
    # The two released models differ only in depth and number of experts.
    sizes = {"gpt-oss-20b": (24, 32), "20b": (24, 32), "gpt-oss-120b": (36, 128), "120b": (36, 128)}
    if name not in sizes:
        raise ValueError(
            f"unknown shape preset {name!r}; expected tiny, gpt-oss-20b or gpt-oss-120b"
        )
    layers, experts = sizes[name]
    return ModelConfig(
        num_layers=layers, num_experts=experts, experts_per_token=4, vocab_size=201088,
        hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
        num_key_value_heads=8, sliding_window=128, layer_types=tuple(_alternating(layers)),
    )  # fmt: skip


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
