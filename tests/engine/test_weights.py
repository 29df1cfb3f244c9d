"""Checkpoint reading: MXFP4 decode and encode bit for bit, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from engine.config import CheckpointError, preset
from engine.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from engine.model.random_checkpoint import write_random_checkpoint
from engine.model.weights import load_weights

TINY = preset("tiny")
SCALES = (0, 1, 100, 126, 127, 128, 150, 254)


# --- MXFP4 -----------------------------------------------------------------------------------------


def e2m1(code: int) -> float:
    """FP4 e2m1 from its definition: sign bit, 2 exponent bits (bias 1), 1 mantissa bit."""
    sign = -1.0 if code & 0b1000 else 1.0
    exponent, mantissa = (code >> 1) & 0b11, code & 0b1
    if exponent == 0:  # subnormal: 2 ** (1 - bias) * (0.m)
        return sign * mantissa / 2
    return sign * 2.0 ** (exponent - 1) * (1 + mantissa / 2)


def all_bytes_at(scales: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of all 256 byte values (16 blocks of 16 bytes) at each scale, and the float64 truth."""
    blocks = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(len(scales), 1, 1)
    scale_t = torch.tensor(scales, dtype=torch.uint8).view(-1, 1).repeat(1, 16)
    expected = torch.empty(len(scales), 512, dtype=torch.float64)
    for row, scale in enumerate(scales):
        for byte in range(256):
            # byte b sits at block b // 16, position b % 16: elements 2 * pos (low), 2 * pos + 1
            at = 32 * (byte // 16) + 2 * (byte % 16)
            expected[row, at] = e2m1(byte & 0xF) * 2.0 ** (scale - 127)
            expected[row, at + 1] = e2m1(byte >> 4) * 2.0 ** (scale - 127)
    return blocks, scale_t, expected


def test_e2m1_table_from_its_definition() -> None:
    assert [e2m1(c) for c in range(8)] == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert [e2m1(c) for c in range(8, 16)] == [-0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


@pytest.mark.parametrize(
    ("dtype", "bits"), [(torch.float32, torch.int32), (torch.bfloat16, torch.int16)]
)
def test_dequantize_is_bit_exact_on_every_byte_and_scale(
    dtype: torch.dtype, bits: torch.dtype
) -> None:
    blocks, scales, expected = all_bytes_at(SCALES)
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert got.shape == expected.shape and got.dtype == dtype
    # float64 -> float32 -> bf16 is exact here: FP4 values have 2 significant bits; beyond the
    # range (6 * 2**127) both sides are the same infinity.
    want = expected.to(torch.float32).to(dtype)
    assert torch.equal(want.to(torch.float64)[want.isfinite()], expected[want.isfinite()])
    mismatch = got.view(bits) != want.view(bits)  # bit for bit: signed zeros and infinities too
    assert not mismatch.any(), [
        (SCALES[r], c, got[r, c].item(), want[r, c].item())
        for r, c in mismatch.nonzero()[:5].tolist()
    ]


def test_dequantize_float16_where_representable() -> None:
    blocks, scales, expected = all_bytes_at((102, 127, 143))
    got = dequantize_mxfp4(blocks, scales, torch.float16).to(torch.float64)
    representable = expected.to(torch.float16).to(torch.float64) == expected
    assert torch.equal(got[representable], expected[representable])
    assert not got.isnan().any()


def test_dequantize_layout_low_nibble_first() -> None:
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x72  # low nibble 2 (1.0) is element 0, high nibble 7 (6.0) element 1
    values = dequantize_mxfp4(blocks, torch.full((1, 1), 128, dtype=torch.uint8), torch.float32)
    assert values[0, :3].tolist() == [2.0, 12.0, 0.0]


def test_dequantize_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(
            torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8)
        )


@pytest.mark.parametrize("exponent", [-127, -126, -100, -20, -3, 0, 1, 7, 60, 120, 124])
def test_fp4_representable_blocks_round_trip_exactly(exponent: int) -> None:
    g = torch.Generator().manual_seed(exponent + 1000)
    codes = torch.randint(0, 16, (64, 32), generator=g)
    codes[0] = torch.arange(32) % 16  # every code point in one block
    codes[1] = 0  # an all-zero block
    codes[2] = torch.randint(0, 4, (32,), generator=g)  # small magnitudes only: max 1.5
    lut = torch.tensor([e2m1(c) for c in range(16)], dtype=torch.float64)
    x = (lut[codes] * 2.0**exponent).to(torch.float32)
    assert bool(x.isfinite().all())
    blocks, scales = quantize_mxfp4(x)
    assert blocks.shape == (64, 1, 16) and scales.shape == (64, 1)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), x)


def fp4_half_step(scaled_magnitude: torch.Tensor) -> torch.Tensor:
    """Half the gap between the FP4 magnitudes around |x| / 2**e (grid 0 .5 1 1.5 2 3 4 6)."""
    return torch.where(
        scaled_magnitude <= 2, 0.25, torch.where(scaled_magnitude <= 4, 0.5, 1.0)
    ).double()


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    log2_std=st.integers(-60, 60),
    heavy=st.booleans(),
)
def test_quantization_error_is_within_half_an_fp4_step(
    seed: int, log2_std: int, heavy: bool
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 128, generator=g) * 2.0**log2_std  # 16 rows of 4 blocks
    if heavy:  # outliers and exact zeros
        x = x * torch.exp(2 * torch.randn(x.shape, generator=g))
        x[torch.rand(x.shape, generator=g) < 0.1] = 0.0
    blocks, scales = quantize_mxfp4(x)
    q = dequantize_mxfp4(blocks, scales, torch.float32).double()
    step = 2.0 ** (scales.double() - 127).repeat_interleave(32, dim=-1)
    x64 = x.double()
    scaled = x64.abs() / step
    amax = scaled.view(16, 4, 32).amax(-1)
    nonzero = amax > 0
    # the shared exponent floor(log2(amax)) - 2 puts each block's largest value in [4, 8)
    assert bool(((amax >= 4) & (amax < 8))[nonzero].all())
    assert bool((scales[~nonzero] == 127).all())
    in_range = scaled <= 6
    err = (q - x64).abs() / step
    assert bool((err[in_range] <= fp4_half_step(scaled[in_range])).all())
    # beyond 6 * 2**e (up to 8 * 2**e) values saturate to +-6 * 2**e
    assert torch.equal(q[~in_range], 6 * step[~in_range] * x64[~in_range].sign())
    assert bool((torch.sign(q) * torch.sign(x64) >= 0).all())


# --- bad checkpoints: CheckpointError that says what is wrong --------------------------------------


@pytest.fixture(scope="module")
def good_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("good_hf"), TINY, layout="hf")


@pytest.fixture(scope="module")
def good_original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_checkpoint(
        tmp_path_factory.mktemp("good_original"), TINY, layout="original"
    )


@pytest.fixture
def hf_copy(tmp_path: Path, good_hf: Path) -> Path:
    return Path(shutil.copytree(good_hf, tmp_path / "hf"))


@pytest.fixture
def original_copy(tmp_path: Path, good_original: Path) -> Path:
    return Path(shutil.copytree(good_original, tmp_path / "original"))


def only_shard(directory: Path) -> Path:
    (shard,) = directory.glob("model-*.safetensors")
    return shard


def rewrite(path: Path, edit) -> None:
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_good_checkpoints_load(good_hf: Path, good_original: Path) -> None:
    assert load_weights(good_hf)[0] == load_weights(good_original)[0] == TINY


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        load_weights(tmp_path / "nowhere")


def test_empty_directory_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as error:
        load_weights(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "no gpt-oss checkpoint" in message
    assert "config.json" in message and "model.safetensors" in message


def test_hf_config_without_safetensors(tmp_path: Path, good_hf: Path) -> None:
    shutil.copy(good_hf / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"config.json but no model\*\.safetensors"):
        load_weights(tmp_path)


def test_original_config_without_safetensors(tmp_path: Path, good_original: Path) -> None:
    (tmp_path / "original").mkdir()
    shutil.copy(good_original / "config.json", tmp_path / "original" / "config.json")
    with pytest.raises(CheckpointError, match=r"has no \*\.safetensors file"):
        load_weights(tmp_path)


def test_index_naming_a_missing_shard(tmp_path: Path) -> None:
    write_random_checkpoint(tmp_path, TINY, layout="hf", max_shard_bytes=1)
    (tmp_path / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names missing files.*model-00002-of-00004"):
        load_weights(tmp_path)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_truncated_safetensors(layout: str, hf_copy: Path, original_copy: Path) -> None:
    directory = hf_copy if layout == "hf" else original_copy
    path = only_shard(directory) if layout == "hf" else directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as error:
        load_weights(directory)
    assert str(path) in str(error.value) and "truncated" in str(error.value)


def test_safetensors_cut_inside_its_header(hf_copy: Path) -> None:
    path = only_shard(hf_copy)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_weights(hf_copy)
    assert str(path) in str(error.value)


def test_not_a_safetensors_file(hf_copy: Path) -> None:
    path = only_shard(hf_copy)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file") as error:
        load_weights(hf_copy)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    ("layout", "name"),
    [
        ("hf", "model.layers.1.self_attn.sinks"),
        ("hf", "model.layers.0.mlp.experts.down_proj_scales"),
        ("hf", "lm_head.weight"),
        ("original", "block.1.attn.qkv.bias"),
        ("original", "block.0.mlp.mlp1_weight.blocks"),
    ],
)
def test_missing_tensor_is_named(
    layout: str, name: str, hf_copy: Path, original_copy: Path
) -> None:
    directory = hf_copy if layout == "hf" else original_copy
    path = only_shard(directory) if layout == "hf" else directory / "model.safetensors"
    rewrite(path, lambda tensors: tensors.pop(name))
    with pytest.raises(CheckpointError, match=f"lacks tensor {name}"):
        load_weights(directory)


@pytest.mark.parametrize(
    ("layout", "name", "expected", "found"),
    [
        ("hf", "model.layers.0.self_attn.q_proj.weight", [64, 64], [64, 32]),
        ("hf", "model.layers.1.mlp.experts.gate_up_proj_blocks", [4, 128, 2, 16], [4, 64, 2, 16]),
        ("original", "block.0.attn.qkv.weight", [128, 64], [96, 64]),
        ("original", "block.1.mlp.mlp2_weight.scales", [4, 64, 2], [4, 64, 1]),
    ],
)
def test_misshaped_tensor_names_both_shapes(
    layout: str,
    name: str,
    expected: list[int],
    found: list[int],
    hf_copy: Path,
    original_copy: Path,
) -> None:
    directory = hf_copy if layout == "hf" else original_copy
    path = only_shard(directory) if layout == "hf" else directory / "model.safetensors"

    def misshape(tensors: dict[str, torch.Tensor]) -> None:
        assert list(tensors[name].shape) == expected
        tensors[name] = torch.zeros(found, dtype=tensors[name].dtype)

    rewrite(path, misshape)
    with pytest.raises(CheckpointError) as error:
        load_weights(directory)
    assert str(error.value) == f"tensor {name}: expected shape {expected}, found {found}"


@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        ("model.layers.0.self_attn.o_proj.weight", torch.float64),
        ("model.layers.0.mlp.router.bias", torch.int16),
        ("model.layers.1.mlp.experts.down_proj_blocks", torch.float64),
    ],
)
def test_unsupported_dtype(name: str, dtype: torch.dtype, hf_copy: Path) -> None:
    path = only_shard(hf_copy)
    rewrite(path, lambda tensors: tensors.__setitem__(name, tensors[name].to(dtype)))
    with pytest.raises(
        CheckpointError, match=r"unsupported dtype (F64|I16); expected one of"
    ) as error:
        load_weights(hf_copy)
    assert name in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [
        (
            "model.layers.0.self_attn.sinks",
            torch.int32,
            "torch.bfloat16 or torch.float16 or torch.float32",
        ),
        ("model.layers.0.mlp.experts.gate_up_proj_scales", torch.int8, "torch.uint8"),
    ],
)
def test_wrong_but_supported_dtype(
    name: str, dtype: torch.dtype, expected: str, hf_copy: Path
) -> None:
    rewrite(only_shard(hf_copy), lambda tensors: tensors.__setitem__(name, tensors[name].to(dtype)))
    with pytest.raises(CheckpointError) as error:
        load_weights(hf_copy)
    assert str(error.value) == f"tensor {name}: expected dtype {expected}, found {dtype}"


@pytest.mark.parametrize(
    ("layout", "key"),
    [
        ("hf", "hidden_size"),
        ("hf", "num_local_experts"),
        ("original", "num_experts"),
        ("original", "vocab_size"),
    ],
)
def test_config_missing_a_key(layout: str, key: str, hf_copy: Path, original_copy: Path) -> None:
    directory = hf_copy if layout == "hf" else original_copy
    config = json.loads((directory / "config.json").read_text())
    del config[key]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=f"config.json lacks '{key}'"):
        load_weights(directory)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_config_that_is_not_json(layout: str, hf_copy: Path, original_copy: Path) -> None:
    directory = hf_copy if layout == "hf" else original_copy
    (directory / "config.json").write_text('{"model_type": "gpt_oss", ')
    with pytest.raises(CheckpointError, match="cannot read") as error:
        load_weights(directory)
    assert str(directory / "config.json") in str(error.value)


def test_config_that_is_not_an_object(hf_copy: Path) -> None:
    (hf_copy / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="should hold a JSON object"):
        load_weights(hf_copy)


def test_config_with_a_non_integer(hf_copy: Path) -> None:
    config = json.loads((hf_copy / "config.json").read_text())
    (hf_copy / "config.json").write_text(json.dumps(config | {"num_hidden_layers": "two"}))
    with pytest.raises(CheckpointError, match="'num_hidden_layers' should be int, found 'two'"):
        load_weights(hf_copy)


def write_raw_safetensors(path: Path, header: object) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(64))


def test_safetensors_header_that_is_not_an_object(hf_copy: Path) -> None:
    write_raw_safetensors(only_shard(hf_copy), [1, 2, 3])
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_weights(hf_copy)


def edit_header(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header in place (the data stays as it is)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def test_header_edit_keeps_a_good_file_good(hf_copy: Path) -> None:
    edit_header(only_shard(hf_copy), lambda header: header.pop("__metadata__"))
    assert load_weights(hf_copy)[0] == TINY


def test_header_with_inconsistent_byte_count(hf_copy: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"

    def lie(header: dict) -> None:
        header[name]["shape"] = [64, 63]

    edit_header(only_shard(hf_copy), lie)
    with pytest.raises(CheckpointError, match=f"tensor {name} of shape \\[64, 63\\] BF16 needs"):
        load_weights(hf_copy)


def test_safetensors_header_entry_without_offsets(hf_copy: Path) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    edit_header(only_shard(hf_copy), lambda header: header[name].pop("data_offsets"))
    with pytest.raises(CheckpointError, match=name):
        load_weights(hf_copy)
