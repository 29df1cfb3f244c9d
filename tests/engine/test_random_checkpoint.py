"""The random checkpoint generator: deterministic, both layouts with the same weights, readable by
our loader and by Hugging Face transformers, experts really quantized to MXFP4."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.config import preset
from engine.kernels.mxfp4 import dequantize_mxfp4
from engine.model.random_checkpoint import write_random_checkpoint
from engine.model.weights import detect_layout, load_weights

TINY = preset("tiny")


@pytest.fixture(scope="module")
def both_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny, 'both' layout, HF sharded one unit (embedding, layer, final) per file."""
    return write_random_checkpoint(
        tmp_path_factory.mktemp("both"), TINY, layout="both", max_shard_bytes=1
    )


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny, HF layout, default sharding (a single shard)."""
    return write_random_checkpoint(tmp_path_factory.mktemp("hf"), TINY, layout="hf")


def _files(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out |= load_file(path)
    return out


def _leaves(obj: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a GptOssWeights, named by its path (so no field can be forgotten)."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, list):
        for i, item in enumerate(obj):
            yield from _leaves(item, f"{prefix}[{i}]")
    else:
        for field in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, field.name), f"{prefix}.{field.name}")


def _hf_names(n_layers: int) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        names |= {f"{p}self_attn.{x}_proj.{k}" for x in "qkvo" for k in ("weight", "bias")}
        names |= {p + "self_attn.sinks", p + "mlp.router.weight", p + "mlp.router.bias"}
        names |= {
            f"{p}mlp.experts.{proj}_{k}"
            for proj in ("gate_up_proj", "down_proj")
            for k in ("blocks", "scales", "bias")
        }
    return names


def _original_names(n_layers: int) -> set[str]:
    names = {"embedding.weight", "norm.scale", "unembedding.weight"}
    for i in range(n_layers):
        b = f"block.{i}."
        names |= {b + "attn.norm.scale", b + "attn.sinks", b + "mlp.norm.scale"}
        names |= {f"{b}attn.{x}.{k}" for x in ("qkv", "out") for k in ("weight", "bias")}
        names |= {f"{b}mlp.gate.{k}" for k in ("weight", "bias")}
        names |= {
            f"{b}mlp.mlp{n}_{k}" for n in (1, 2) for k in ("weight.blocks", "weight.scales", "bias")
        }
    return names


# --- determinism -----------------------------------------------------------------------------------


def test_same_inputs_give_byte_identical_files(tmp_path: Path, both_dir: Path) -> None:
    again = write_random_checkpoint(tmp_path / "again", TINY, layout="both", max_shard_bytes=1)
    first, second = _files(both_dir), _files(again)
    assert sorted(first) == sorted(second)
    for name, data in first.items():
        assert data == second[name], name


def test_another_seed_gives_other_values(tmp_path: Path, hf_dir: Path) -> None:
    other = write_random_checkpoint(tmp_path, TINY, layout="hf", seed=1)
    ours, theirs = _tensors(hf_dir), _tensors(other)
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        assert not torch.equal(tensor, theirs[name]), name


def test_values_do_not_depend_on_sharding_or_write_order(hf_dir: Path, both_dir: Path) -> None:
    single, sharded = _tensors(hf_dir), _tensors(both_dir)
    assert len(list(hf_dir.glob("*.safetensors"))) == 1
    assert len(list(both_dir.glob("*.safetensors"))) == TINY.num_layers + 2
    assert single.keys() == sharded.keys()
    for name, tensor in single.items():
        assert torch.equal(tensor, sharded[name]), name


def test_dense_dtype_only_rounds_the_same_draw(tmp_path: Path, hf_dir: Path) -> None:
    f32 = _tensors(write_random_checkpoint(tmp_path, TINY, layout="hf", dtype=torch.float32))
    bf16 = _tensors(hf_dir)
    for name, tensor in f32.items():
        if tensor.dtype == torch.uint8:
            assert torch.equal(tensor, bf16[name]), name
        else:
            assert tensor.dtype == torch.float32, name
            assert torch.equal(tensor.to(torch.bfloat16), bf16[name]), name


# --- the files -------------------------------------------------------------------------------------


def test_hf_files_names_dtypes_and_index(both_dir: Path) -> None:
    config = json.loads((both_dir / "config.json").read_text())
    assert config["model_type"] == "gpt_oss"
    assert config == json.loads(json.dumps(TINY.to_hf_dict() | {"torch_dtype": "bfloat16"}))
    index = json.loads((both_dir / "model.safetensors.index.json").read_text())
    shards = sorted(both_dir.glob("model-*-of-*.safetensors"))
    assert [p.name for p in shards] == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    seen: dict[str, str] = {}
    total = 0
    for shard in shards:
        with safe_open(shard, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensor = f.get_tensor(name)
                seen[name] = shard.name
                total += tensor.numel() * tensor.element_size()
                is_mxfp4 = name.endswith(("_blocks", "_scales"))
                assert tensor.dtype == (torch.uint8 if is_mxfp4 else torch.bfloat16), name
    assert set(seen) == _hf_names(TINY.num_layers)
    assert index["weight_map"] == seen
    assert index["metadata"]["total_size"] == total


def test_original_files_names_and_dtypes(both_dir: Path) -> None:
    original = both_dir / "original"
    assert sorted(p.name for p in original.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((original / "config.json").read_text()) == json.loads(
        json.dumps(TINY.to_original_dict())
    )
    tensors = load_file(original / "model.safetensors")
    assert set(tensors) == _original_names(TINY.num_layers)
    for name, tensor in tensors.items():
        is_mxfp4 = name.endswith((".blocks", ".scales"))
        assert tensor.dtype == (torch.uint8 if is_mxfp4 else torch.bfloat16), name


def test_safetensors_header_is_padded_and_tensors_aligned(both_dir: Path) -> None:
    for path in [*both_dir.glob("*.safetensors"), both_dir / "original" / "model.safetensors"]:
        raw = path.read_bytes()
        header_len = int.from_bytes(raw[:8], "little")
        assert header_len % 8 == 0, path
        header = json.loads(raw[8 : 8 + header_len])
        header.pop("__metadata__")
        spans = sorted(entry["data_offsets"] for entry in header.values())
        assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - header_len, path
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), path  # no holes
        for entry in header.values():
            itemsize = {"BF16": 2, "F32": 4, "U8": 1}[entry["dtype"]]
            assert entry["data_offsets"][0] % itemsize == 0, (path, entry)


def test_detect_layout(tmp_path: Path, both_dir: Path) -> None:
    assert detect_layout(both_dir) == "hf"
    assert detect_layout(both_dir / "original") == "original"
    only = write_random_checkpoint(tmp_path, TINY, layout="original")
    assert sorted(p.name for p in only.iterdir()) == ["config.json", "model.safetensors"]
    assert detect_layout(only) == "original"


def test_rewriting_a_directory_leaves_no_stale_shards(tmp_path: Path, hf_dir: Path) -> None:
    write_random_checkpoint(tmp_path, TINY, layout="hf", max_shard_bytes=1)
    assert len(list(tmp_path.glob("*.safetensors"))) == TINY.num_layers + 2
    write_random_checkpoint(tmp_path, TINY, layout="hf")
    assert _files(tmp_path) == _files(hf_dir)
    write_random_checkpoint(tmp_path, TINY, layout="original")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob("*.partial"))


def test_unknown_layout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown layout"):
        write_random_checkpoint(tmp_path, TINY, layout="gguf")


# --- the weights -----------------------------------------------------------------------------------


def test_both_layouts_load_to_identical_weights(both_dir: Path) -> None:
    hf_config, hf = load_weights(both_dir)
    orig_config, orig = load_weights(both_dir / "original")
    assert hf_config == orig_config == TINY
    hf_leaves, orig_leaves = dict(_leaves(hf)), dict(_leaves(orig))
    # 3 model-wide tensors, and per layer 10 attention and 3 + 2 * 3 MoE tensors
    assert len(hf_leaves) == 3 + 19 * TINY.num_layers
    assert hf_leaves.keys() == orig_leaves.keys()
    for name, tensor in hf_leaves.items():
        other = orig_leaves[name]
        assert tensor.dtype == other.dtype and tensor.shape == other.shape, name
        assert torch.equal(tensor, other), name


def test_values_look_like_a_model(both_dir: Path) -> None:
    _, w = load_weights(both_dir, dtype=torch.float32)
    assert 0.95 < w.embedding.std() < 1.05
    assert 0.015 < w.unembedding.std() < 0.025
    assert 0.9 < w.norm.mean() < 1.1 and 0.05 < w.norm.std() < 0.15
    tensors = [t for _, t in _leaves(w) if t.dtype != torch.uint8]
    for layer in w.layers:
        a, m = layer.attn, layer.moe
        for t in (a.q_weight, a.k_weight, a.v_weight, a.o_weight, m.router_weight, m.mlp1.bias):
            assert 0.015 < t.std() < 0.025
        assert 0.9 < a.norm.mean() < 1.1 and 0.9 < m.norm.mean() < 1.1
    # Every tensor draws its own values (seeded by its name).
    firsts = {tuple(t.flatten()[:4].tolist()) for t in tensors}
    assert len(firsts) == len(tensors)


def test_experts_are_really_quantized(both_dir: Path) -> None:
    """quantize_mxfp4 puts each block's largest value in FP4's top binade (4.0 or 6.0)."""
    _, w = load_weights(both_dir)
    for layer in w.layers:
        for experts in (layer.moe.mlp1, layer.moe.mlp2):
            codes = torch.stack((experts.blocks & 7, experts.blocks >> 4 & 7), dim=-1)
            top = codes.flatten(-2).amax(dim=-1)
            assert bool(((top == 6) | (top == 7)).all())
            assert len(experts.scales.unique()) > 1
            values = dequantize_mxfp4(experts.blocks, experts.scales, torch.float32)
            assert 0.015 < values.std() < 0.025


def test_random_codes_experts_are_valid_mxfp4(tmp_path: Path, both_dir: Path) -> None:
    write_random_checkpoint(tmp_path, TINY, layout="both", quantize_experts=False)
    _, hf = load_weights(tmp_path)
    _, orig = load_weights(tmp_path / "original")
    _, quantized = load_weights(both_dir)
    for layer, orig_layer, q_layer in zip(hf.layers, orig.layers, quantized.layers, strict=True):
        for experts, orig_experts in (
            (layer.moe.mlp1, orig_layer.moe.mlp1),
            (layer.moe.mlp2, orig_layer.moe.mlp2),
        ):
            assert torch.equal(experts.blocks, orig_experts.blocks)
            assert set(experts.scales.unique().tolist()) <= {119, 120}
            values = dequantize_mxfp4(experts.blocks, experts.scales, torch.float32)
            assert 0.01 < values.std() < 0.03
        assert not torch.equal(layer.moe.mlp1.blocks, q_layer.moe.mlp1.blocks)
        assert torch.equal(layer.attn.q_weight, q_layer.attn.q_weight)  # dense draws unchanged


# --- Hugging Face transformers reads the HF layout -------------------------------------------------


def test_transformers_loads_the_hf_layout_with_our_values(both_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model, info = transformers.GptOssForCausalLM.from_pretrained(
        both_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    _, w = load_weights(both_dir, dtype=torch.float32)
    hf = model.model
    assert torch.equal(hf.embed_tokens.weight, w.embedding)
    assert torch.equal(hf.norm.weight, w.norm)
    assert torch.equal(model.lm_head.weight, w.unembedding)
    for ours, layer in zip(w.layers, hf.layers, strict=True):
        a, m, attn, mlp = ours.attn, ours.moe, layer.self_attn, layer.mlp
        pairs = {
            "input_layernorm": (layer.input_layernorm.weight, a.norm),
            "q": (attn.q_proj.weight, a.q_weight), "q_bias": (attn.q_proj.bias, a.q_bias),
            "k": (attn.k_proj.weight, a.k_weight), "k_bias": (attn.k_proj.bias, a.k_bias),
            "v": (attn.v_proj.weight, a.v_weight), "v_bias": (attn.v_proj.bias, a.v_bias),
            "o": (attn.o_proj.weight, a.o_weight), "o_bias": (attn.o_proj.bias, a.o_bias),
            "sinks": (attn.sinks, a.sinks),
            "post_attention_layernorm": (layer.post_attention_layernorm.weight, m.norm),
            "router": (mlp.router.weight, m.router_weight),
            "router_bias": (mlp.router.bias, m.router_bias),
            "gate_up_proj_bias": (mlp.experts.gate_up_proj_bias, m.mlp1.bias),
            "down_proj_bias": (mlp.experts.down_proj_bias, m.mlp2.bias),
            # HF keeps experts dequantized as [E, in, out]: ours are [E, out, in] for x @ W.T.
            "gate_up_proj": (
                mlp.experts.gate_up_proj,
                dequantize_mxfp4(m.mlp1.blocks, m.mlp1.scales, torch.float32).transpose(1, 2),
            ),
            "down_proj": (
                mlp.experts.down_proj,
                dequantize_mxfp4(m.mlp2.blocks, m.mlp2.scales, torch.float32).transpose(1, 2),
            ),
        }  # fmt: skip
        for name, (theirs, mine) in pairs.items():
            assert theirs.shape == mine.shape, name
            assert torch.equal(theirs, mine), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])).logits
    assert logits.shape == (1, 8, TINY.vocab_size)
    assert bool(torch.isfinite(logits).all())
    assert 0.01 < logits.std() < 10  # neither degenerate nor exploding


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_writes_what_the_library_writes(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    command = [sys.executable, "-m", "engine.model.random_checkpoint", "--preset", "tiny"]
    command += ["--layout", "original", "--out", str(out), "--seed", "3", "--dtype", "float32"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # it logs, it does not print
    assert "layer 1 written" in result.stderr and f"wrote {out}" in result.stderr
    library = write_random_checkpoint(
        tmp_path / "library", TINY, layout="original", seed=3, dtype=torch.float32
    )
    assert _files(out) == _files(library)
    config, weights = load_weights(out, dtype=torch.float32)
    assert config == TINY and weights.embedding.dtype == torch.float32


def test_cli_rejects_an_unknown_preset(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "engine.model.random_checkpoint", "--preset", "gpt-5"]
    result = subprocess.run(
        [*command, "--out", str(tmp_path)], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
