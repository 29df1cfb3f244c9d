"""The fused CPU kernels (`engine/kernels/csrc/mxfp4_cpu.cpp`) against their plain-PyTorch twins.

Every instruction-set path this CPU runs is forced in turn (scalar, AVX2, AVX-512, AVX-512 VNNI):
the MXFP4 matmul equals dequantize-then-matmul in fp32 over odd shapes and token counts, decodes
every one of the 16 nibbles under every one of the 256 scales exactly, and the fused mixture of
experts equals `reference.moe` (fp32: to fp32 rounding; bf16: closer to the exact result than the
bf16 reference is). Skipped, with the reason, where the extension cannot be built.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from engine.kernels import REFERENCE, cpu, cpu_kernels, reference, select_kernels
from engine.kernels.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from engine.model.forward_batch import CacheGroupBatch
from engine.model.weights import Mxfp4Experts

if not cpu.load():
    pytest.skip(
        "the fused CPU kernels could not be built here (no C++ compiler or ninja?)",
        allow_module_level=True,
    )

ISAS = cpu.supported_isas()
# The bf16 matmul's two loops: FMAs on widened values everywhere, vdpbf16ps where the CPU has it.
BF16_DOT = [False, True] if cpu.linear_bf16_dot_supported() else [False]


def random_mxfp4(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return quantize_mxfp4(torch.randn(rows, cols, generator=g))


def relative_error(ours: torch.Tensor, exact: torch.Tensor) -> float:
    return ((ours.float() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


def block_max(x: torch.Tensor) -> torch.Tensor:
    """Each value replaced by the largest magnitude of its block of 32."""
    amax = x.float().abs().unflatten(-1, (-1, 32)).amax(-1, keepdim=True)
    return amax.expand(*amax.shape[:-1], 32).flatten(-2)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("rows", "cols", "tokens"),
    [(1, 32, 1), (3, 64, 2), (37, 96, 3), (64, 160, 4), (129, 224, 5), (70, 2880, 9), (5, 128, 1)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_equals_dequantize_then_matmul(
    isa: str, rows: int, cols: int, tokens: int, dtype: torch.dtype
) -> None:
    blocks, scales = random_mxfp4(rows, cols, seed=rows * cols)
    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    bias = torch.randn(rows)
    weight = dequantize_mxfp4(blocks, scales, torch.float32)
    exact = F.linear(x.float(), weight, bias)
    ours = cpu.mxfp4_linear(x, blocks, scales, bias, isa)
    assert ours.shape == (tokens, rows) and ours.dtype == torch.float32
    # Summation order: a few fp32 ulps of the sum of |products|. The int16 path (bf16
    # activations) also rounds each activation to 2^-16 of its block's largest magnitude.
    bound = F.linear(x.float().abs(), weight.abs(), bias.abs()) * 1e-6
    if isa == "avx512vnni" and dtype == torch.bfloat16:
        bound += F.linear(block_max(x), weight.abs()) * 2**-16
    assert ((ours - exact).abs() <= bound).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_nibble_under_every_scale_decodes_exactly(isa: str, dtype: torch.dtype) -> None:
    """Row r has scale r in both its blocks; its bytes hold all 16 low and 16 high nibbles. One-hot
    activations read single weights back, exactly: 2^-127 (subnormal) up to the overflow to inf of
    the largest values under scales 253 and 254. 0xFF (NaN in the MX spec) poisons its row."""
    cols = 64
    pattern = torch.arange(16, dtype=torch.uint8) | (torch.arange(15, -1, -1).to(torch.uint8) << 4)
    g = torch.Generator().manual_seed(0)
    blocks = torch.stack([pattern[torch.randperm(16, generator=g)] for _ in range(256 * 2)])
    blocks = blocks.view(256, 2, 16)
    scales = torch.arange(256, dtype=torch.uint8)[:, None].expand(256, 2).contiguous()
    eye = torch.eye(cols, dtype=dtype)
    ours = cpu.mxfp4_linear(eye, blocks, scales, None, isa)  # [t, r] = W[r, t]
    weight = dequantize_mxfp4(blocks, scales, torch.float32)  # [r, t]
    torch.testing.assert_close(ours[:, :255], weight[:255].T, rtol=0, atol=0)
    assert ours[:, 255].isnan().all()


def experts(n: int, rows: int, cols: int, seed: int, dtype: torch.dtype) -> Mxfp4Experts:
    g = torch.Generator().manual_seed(seed)
    blocks, scales = quantize_mxfp4(torch.randn(n, rows, cols, generator=g) * 0.05)
    return Mxfp4Experts(blocks, scales, (torch.randn(n, rows, generator=g) * 0.1).to(dtype))


def moe_inputs(tokens: int, hidden: int, inter: int, n_experts: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, hidden, generator=g) * 3).to(dtype)  # large enough to clamp gates
    router_w = torch.randn(n_experts, hidden, generator=g).to(dtype)
    router_b = torch.randn(n_experts, generator=g).to(dtype)
    mlp1 = experts(n_experts, 2 * inter, hidden, seed + 1, dtype)
    mlp2 = experts(n_experts, hidden, inter, seed + 2, dtype)
    return x, router_w, router_b, mlp1, mlp2


def as_fp32(e: Mxfp4Experts) -> Mxfp4Experts:
    return Mxfp4Experts(e.blocks, e.scales, e.bias.float())


MOE_SHAPES = [
    # tokens, hidden, intermediate, experts, top-k
    (1, 64, 64, 4, 2),
    (2, 160, 96, 8, 4),  # 5 and 3 blocks: partial quads on both matmuls
    (3, 96, 32, 3, 3),  # every token on every expert
    (4, 128, 64, 32, 4),
    (7, 64, 160, 4, 1),
    (33, 96, 64, 4, 2),  # experts with many tokens: several token tiles
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("tokens", "hidden", "inter", "n_experts", "top_k"), MOE_SHAPES)
def test_moe_equals_reference_fp32(isa, tokens, hidden, inter, n_experts, top_k) -> None:
    x, rw, rb, mlp1, mlp2 = moe_inputs(tokens, hidden, inter, n_experts, torch.float32, tokens)
    exact = reference.moe(x, rw, rb, mlp1, mlp2, top_k, 1.702, 7.0)
    ours = cpu.moe(x, rw, rb, mlp1, mlp2, top_k, 1.702, 7.0, isa=isa)
    assert ours.dtype == torch.float32 and ours.shape == x.shape
    assert relative_error(ours, exact) < 5e-6


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("tokens", "hidden", "inter", "n_experts", "top_k"), MOE_SHAPES)
def test_moe_bf16_is_closer_to_exact_than_the_bf16_reference(
    isa, tokens, hidden, inter, n_experts, top_k
) -> None:
    """bf16 in, bf16 out. The exact answer: the bf16 routing (the spec's, both use it), then the
    experts in fp32 on the same bf16 inputs. The bf16 reference rounds every intermediate to bf16;
    the in-register kernel only its output (and, on the int16 path, activations to 2^-16 of their
    block's largest). Experts with 16+ tokens go through decoded tiles and a bf16 matmul, with the
    reference's roundings: about as close as the reference there."""
    x, rw, rb, mlp1, mlp2 = moe_inputs(tokens, hidden, inter, n_experts, torch.bfloat16, tokens)
    weights, ids = reference.route(x, rw, rb, top_k)
    exact = torch.zeros(x.shape)
    for expert in ids.unique().tolist():
        rows, slot = torch.where(ids == expert)
        w1 = dequantize_mxfp4(mlp1.blocks[expert], mlp1.scales[expert], torch.float32)
        h = reference.swiglu(F.linear(x[rows].float(), w1, mlp1.bias[expert].float()), 1.702, 7.0)
        w2 = dequantize_mxfp4(mlp2.blocks[expert], mlp2.scales[expert], torch.float32)
        y = F.linear(h, w2, mlp2.bias[expert].float())
        exact.index_add_(0, rows, y * weights[rows, slot, None])
    bf16_reference = reference.moe(x, rw, rb, mlp1, mlp2, top_k, 1.702, 7.0)
    ours = cpu.moe(x, rw, rb, mlp1, mlp2, top_k, 1.702, 7.0, isa=isa)
    assert ours.dtype == torch.bfloat16 and ours.shape == x.shape
    ours_error = (ours.float() - exact).abs()
    busy = ids.flatten().bincount(minlength=n_experts) >= cpu.DENSE_MIN_TOKENS
    in_register = ~busy[ids].any(-1)  # tokens none of whose experts took the matmul path
    # The output's rounding is up to half a bf16 ulp (2^-9 relative); the int16 rounding of
    # activations adds 2^-16 of a block's largest, which shows where outputs cancel.
    bound = exact.abs() * 2**-8 + 1e-4 * exact.abs().max()
    assert (ours_error <= bound)[in_register].all()
    slack = 1.0 if in_register.all() else 1.25
    assert ours_error.norm() <= slack * (bf16_reference.float() - exact).abs().norm()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_prefill_chunk_takes_the_matmul_path(isa: str, dtype: torch.dtype) -> None:
    """64 tokens over 4 experts (top-2): every expert sees 16+ tokens and goes through decoded
    tiles (several: 2 * 320 rows > one tile of 512) and matmuls."""
    x, rw, rb, mlp1, mlp2 = moe_inputs(64, 96, 320, 4, dtype, 9)
    _, ids = reference.route(x, rw, rb, 2)
    assert (ids.flatten().bincount(minlength=4) >= cpu.DENSE_MIN_TOKENS).all()
    ours = cpu.moe(x, rw, rb, mlp1, mlp2, 2, 1.702, 7.0, isa=isa)
    theirs = reference.moe(x, rw, rb, mlp1, mlp2, 2, 1.702, 7.0)
    if dtype == torch.float32:
        assert relative_error(ours, theirs) < 5e-6
    else:
        exact = reference.moe(
            x.float(), rw.float(), rb.float(), as_fp32(mlp1), as_fp32(mlp2), 2, 1.702, 7.0
        )
        assert (ours.float() - exact).norm() <= 1.25 * (theirs.float() - exact).norm()


def test_moe_routes_exactly_like_the_reference() -> None:
    """Routing is the reference's own function: equal ids, equal weights, so results of a token
    with one dominant expert match closely even through the bf16 paths."""
    x, rw, rb, mlp1, mlp2 = moe_inputs(5, 64, 64, 4, torch.float32, 3)
    for isa in ISAS:
        ours = cpu.moe(x, rw, rb, mlp1, mlp2, 1, 1.702, 7.0, isa=isa)
        exact = reference.moe(x, rw, rb, mlp1, mlp2, 1, 1.702, 7.0)
        assert relative_error(ours, exact) < 5e-6


def test_backend_selection() -> None:
    assert select_kernels("auto", "cpu").name == f"cpu-{cpu.best_isa()}"
    assert select_kernels("reference", "cpu") is REFERENCE
    assert select_kernels("cpu", "cpu").moe.keywords == {"isa": cpu.best_isa()}
    with pytest.raises(ValueError, match="unknown kernel backend"):
        select_kernels("fastest", "cpu")
    with pytest.raises(ValueError, match="not supported"):
        cpu_kernels("avx9000")


def test_unsupported_isa_is_refused_by_the_extension() -> None:
    blocks, scales = random_mxfp4(4, 32, seed=0)
    with pytest.raises(ValueError, match="unknown ISA"):
        cpu.mxfp4_linear(torch.ones(1, 32), blocks, scales, None, "sse9")


def test_without_a_compiler_the_reference_path_is_used_and_says_why(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A fresh cache (nothing built) and no compiler: no exception, one warning that names the
    missing compiler and the fallback; `auto` then picks the reference kernels."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with caplog.at_level(logging.WARNING, logger="engine.kernels.cpu"):
        assert cpu.build_and_load() is False
    assert "no C++ compiler found" in caplog.text and "reference kernels" in caplog.text
    monkeypatch.setattr(cpu, "load", lambda: False)
    assert select_kernels("auto", "cpu") is REFERENCE
    with pytest.raises(RuntimeError, match="could not be built"):
        select_kernels("cpu", "cpu")


def test_a_prebuilt_library_is_loaded_without_a_compiler(tmp_path) -> None:
    """The container image's case: the library sits in the package's prebuilt directory under
    its build key, the cache is empty and there is no compiler. A fresh interpreter (a process
    loads the operators once) loads it and runs an MXFP4 matmul with it."""
    key = cpu._build_key()
    built = next(
        path
        for path in (cpu.library_in(cpu.PREBUILT_ROOT / key),
                     cpu.library_in(cpu._writable_build_dir(key)))
        if path.is_file()
    )  # fmt: skip
    prebuilt = tmp_path / "prebuilt"
    copied = cpu.library_in(prebuilt / key)
    copied.parent.mkdir(parents=True)
    shutil.copy2(built, copied)
    script = f"""
import logging, pathlib, torch
logging.basicConfig(level=logging.WARNING)
from engine.kernels import cpu
from engine.kernels.mxfp4 import quantize_mxfp4
cpu.PREBUILT_ROOT = pathlib.Path({str(prebuilt)!r})
assert cpu.build_and_load()
print(cpu.best_isa(), cpu.mxfp4_linear(torch.ones(1, 32), *quantize_mxfp4(torch.randn(4, 32))).shape)
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "empty-cache"), "CXX": "no-such-cxx"}
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True,
        timeout=120, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == cpu.best_isa(), result.stdout
    assert "torch.Size([1, 4])" in result.stdout
    assert not list((tmp_path / "empty-cache").rglob("*.so")), "it compiled instead"
    assert "fused CPU kernels" not in result.stderr  # no warning: no fallback


# --- the dense-side ops: RMSNorm, RoPE, paged attention ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (5, 2880), (3, 4, 16)])
def test_rms_norm_equals_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g) * 4).to(dtype)
    weight = 1 + torch.randn(shape[-1], generator=g) * 0.1
    ours, theirs = cpu.rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5)
    assert ours.dtype == dtype and ours.shape == x.shape
    # Only the sum of squares differs (fp64 here, pairwise fp32 there): a few fp32 ulps, or a
    # flipped bf16 rounding.
    ulp = 2**-20 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(ours, theirs, rtol=ulp, atol=ulp)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_is_bit_identical_to_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    positions = torch.tensor([0, 1, 7, 300, 4097])
    inv_freq, concentration = reference.yarn_inv_freq(64, 150000.0, 32.0, 4096, 1.0, 32.0)
    cos, sin = reference.rope_cos_sin(positions, inv_freq, concentration)
    x = torch.randn(5, 8, 64, generator=g).to(dtype)
    assert torch.equal(cpu.apply_rope(x, cos, sin), reference.apply_rope(x, cos, sin))


def paged_case(dtype: torch.dtype, query_lens: list[int], seq_lens: list[int], seed: int = 0):
    """Caches filled with random K/V, each sequence's blocks scattered in a shuffled pool, and
    this step's q, k, v."""
    g = torch.Generator().manual_seed(seed)
    n_heads, n_kv, d, block = 8, 2, 16, 16
    width = max(-(-s // block) for s in seq_lens)
    pool = torch.randperm(len(seq_lens) * width + 4, generator=g)[: len(seq_lens) * width] + 1
    tables = pool.view(len(seq_lens), width)
    n_blocks = int(pool.max()) + 1
    k_cache = torch.randn(n_blocks, block, n_kv, d, generator=g).to(dtype)
    v_cache = torch.randn(n_blocks, block, n_kv, d, generator=g).to(dtype)
    slots = []
    for i, (n_q, s) in enumerate(zip(query_lens, seq_lens, strict=True)):
        slots += [int(tables[i, p // block]) * block + p % block for p in range(s - n_q, s)]
    t = sum(query_lens)
    q = torch.randn(t, n_heads, d, generator=g).to(dtype)
    k = torch.randn(t, n_kv, d, generator=g).to(dtype)
    v = torch.randn(t, n_kv, d, generator=g).to(dtype)
    sinks = torch.randn(n_heads, generator=g)
    group = CacheGroupBatch(block_tables=tables, slot_mapping=torch.tensor(slots))
    return q, k, v, k_cache, v_cache, sinks, group


ATTENTION_CASES = [
    ([1], [1]),  # a first token: itself and the sink
    ([1, 1, 1], [17, 40, 3]),  # decodes of different lengths
    ([1, 3, 20, 1], [50, 33, 20, 100]),  # decodes, a short chunk, a long (reference) chunk
    ([5], [300]),  # a chunk deep into a long context: several key chunks
]


@pytest.mark.parametrize("window", [None, 8, 128])
@pytest.mark.parametrize(("query_lens", "seq_lens"), ATTENTION_CASES)
def test_paged_attention_equals_reference_fp32(query_lens, seq_lens, window) -> None:
    args = paged_case(torch.float32, query_lens, seq_lens)
    q, k, v, k_cache, v_cache, sinks, group = args
    ours_cache = (k_cache.clone(), v_cache.clone())
    theirs = reference.paged_attention(
        q, k, v, k_cache, v_cache, sinks, group, tuple(query_lens), tuple(seq_lens), window, 0.25
    )
    ours = cpu.paged_attention(
        q, k, v, *ours_cache, sinks, group, tuple(query_lens), tuple(seq_lens), window, 0.25
    )
    assert torch.equal(ours_cache[0], k_cache) and torch.equal(ours_cache[1], v_cache)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("query_lens", "seq_lens"), ATTENTION_CASES)
def test_paged_attention_bf16_is_as_close_to_exact_as_reference(query_lens, seq_lens) -> None:
    """bf16: the reference rounds scores and probabilities to bf16, the kernel only its output."""
    q, k, v, k_cache, v_cache, sinks, group = paged_case(torch.bfloat16, query_lens, seq_lens)
    lens = (tuple(query_lens), tuple(seq_lens))
    exact = reference.paged_attention(
        q.float(), k.float(), v.float(), k_cache.float(), v_cache.float(), sinks, group, *lens,
        16, 0.25,
    )  # fmt: skip
    theirs = reference.paged_attention(
        q, k, v, k_cache.clone(), v_cache.clone(), sinks, group, *lens, 16, 0.25
    )
    ours = cpu.paged_attention(q, k, v, k_cache, v_cache, sinks, group, *lens, 16, 0.25)
    assert ours.dtype == torch.bfloat16
    ours_error = (ours.float() - exact).abs()
    fused = torch.tensor([n <= cpu.MAX_FUSED_QUERIES for n in query_lens for _ in range(n)])
    assert (ours_error <= exact.abs() * 2**-8 + 1e-3)[fused].all()  # longer: the reference's
    assert ours_error.norm() <= (theirs.float() - exact).abs().norm()


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(("rows", "cols"), [(1, 16), (7, 100), (129, 2880), (64, 4096)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("bf16_dot", BF16_DOT)
def test_linear_equals_f_linear(
    tokens: int, rows: int, cols: int, with_bias: bool, bf16_dot: bool
) -> None:
    """bf16 in and out, fp32 sums rounded once: PyTorch's result up to one bf16 rounding flip
    (the order of the sum differs). Five tokens go to PyTorch itself."""
    g = torch.Generator().manual_seed(rows + cols)
    x = torch.randn(tokens, cols, generator=g).bfloat16()
    weight = torch.randn(rows, cols, generator=g).bfloat16()
    bias = torch.randn(rows, generator=g).bfloat16() if with_bias else None
    ours = cpu.linear(x, weight, bias, bf16_dot=bf16_dot)
    theirs = F.linear(x, weight, bias)
    assert ours.dtype == torch.bfloat16 and ours.shape == (tokens, rows)
    exact = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    torch.testing.assert_close(ours.float(), exact, rtol=2**-8, atol=1e-5 * cols**0.5)
    assert ((ours.float() - theirs.float()).abs() <= theirs.float().abs() * 2**-7 + 1e-5).all()


@pytest.mark.parametrize("bf16_dot", BF16_DOT)
def test_linear_many_equals_one_linear_each(bf16_dot: bool) -> None:
    """q, k and v in one pass: the same as three calls (bit for bit), biases given or not."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 96, generator=g).bfloat16()
    weights = [torch.randn(rows, 96, generator=g).bfloat16() for rows in (128, 16, 70)]
    biases = [
        torch.randn(128, generator=g).bfloat16(),
        None,
        torch.randn(70, generator=g).bfloat16(),
    ]
    many = cpu.linear_many(x, weights, biases, bf16_dot=bf16_dot)
    for out, w, b in zip(many, weights, biases, strict=True):
        assert torch.equal(out, cpu.linear(x, w, b, bf16_dot=bf16_dot))
    theirs = reference.linear_many(x, weights, biases)
    assert [a.shape for a in many] == [b.shape for b in theirs]
