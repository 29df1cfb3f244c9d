"""The compiled CPU kernels (`csrc/*.cpp`): built on first use, loaded, and called.

`csrc/mxfp4_cpu.cpp` holds the fused MXFP4 experts; `csrc/dense_cpu.cpp` the bf16 matmuls of
decode steps, RMSNorm, RoPE and attention over the paged cache. The functions here wrap them with
the signatures of `reference.py` (and `F.linear`), their specification.

The C++ sources are compiled once per machine with `torch.utils.cpp_extension` (a C++ compiler
and ninja are needed) into a cache directory named by a hash of the sources, the flags and the
torch and Python versions, so an edited source or another torch builds afresh and an unchanged one
is only loaded. A library compiled into the installed package beforehand (`python -m
engine.kernels.prebuild`, the container image's build step: its runtime has no compiler) is
loaded first, under the same hash. When it cannot be built (no compiler, a failed build, a cache
that cannot be written) `load()` logs why, once, and returns False: callers then use the PyTorch
reference kernels.

The instruction set is picked at run time (`best_isa()`); every op takes an `isa` argument so
tests can force each path this CPU supports.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils import cpp_extension

from engine.kernels import reference
from engine.model.forward_batch import CacheGroupBatch
from engine.model.weights import Mxfp4Experts

logger = logging.getLogger(__name__)

# Paths in the order of preference of the C++ code's dispatch (higher is faster).
ISAS: dict[str, int] = {"scalar": 0, "avx2": 1, "avx512": 2, "avx512vnni": 3}
_SOURCES = tuple(
    Path(__file__).resolve().parent / "csrc" / name for name in ("mxfp4_cpu.cpp", "dense_cpu.cpp")
)
_NAME = "gpt_oss_cpu_kernels"
# Libraries compiled at install time, one directory per build key (see `prebuild`).
PREBUILT_ROOT = Path(__file__).resolve().parent / "prebuilt"
# No -march: the library must run on any x86-64 (the cache may be shared by a container image
# built elsewhere); each vector path carries its own target attribute and is chosen at run time.
# -fopenmp: ATen's parallel_for is a header template that runs serially unless compiled with
# OpenMP; the library then binds to the libgomp.so.1 that torch has already loaded (one runtime).
_CFLAGS = ("-O3", "-std=c++17", "-fno-math-errno", "-fopenmp")
_LDFLAGS = ("-fopenmp",)


def library_in(directory: Path) -> Path:
    """The library's file in a build directory (`<root>/<build key>`, prebuilt or cached)."""
    return directory / f"{_NAME}.so"


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "gpt-oss-server" / "cpu-kernels"


def _build_key() -> str:
    headers = sorted(_SOURCES[0].parent.glob("*.h"))
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in (*_SOURCES, *headers)))
    tags = (torch.__version__, sys.version.split()[0], platform.machine(), *_CFLAGS, *_LDFLAGS)
    digest.update("\0".join(tags).encode())
    return digest.hexdigest()[:16]


def _writable_build_dir(key: str) -> Path:
    """The build directory under the user's cache, or under the temp dir when that is read-only."""
    for root in (_cache_root(), Path(tempfile.gettempdir()) / f"gpt-oss-server-{os.getuid()}"):
        directory = root / key
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(directory, os.W_OK):
            return directory
    raise OSError("no writable cache directory for the compiled CPU kernels")


def _missing_tools() -> str | None:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler found ({compiler!r} is not on PATH; install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


_FALLBACK = "using the PyTorch reference kernels (correct, but far slower for MXFP4 experts)"


@functools.cache
def load() -> bool:
    """Build (first use) and load the extension; False, with one logged reason, if impossible."""
    if hasattr(torch.ops, "gpt_oss_cpu") and hasattr(torch.ops.gpt_oss_cpu, "best_isa"):
        return True  # loaded already in this process
    return build_and_load()


def build_and_load() -> bool:
    """Load the library: the prebuilt one, else the cached one, compiling it there first if
    needed (uncached: `load`)."""
    try:
        key = _build_key()
        prebuilt = library_in(PREBUILT_ROOT / key)
        if prebuilt.is_file():
            torch.ops.load_library(str(prebuilt))
            return True
        directory = _writable_build_dir(key)
        library = library_in(directory)
        if library.is_file():
            torch.ops.load_library(str(library))
            return True
        missing = _missing_tools()
        if missing is not None:
            logger.warning("fused CPU kernels unavailable: %s; %s", missing, _FALLBACK)
            return False
        logger.info("compiling the fused CPU kernels (once; about a minute) in %s", directory)
        start = time.perf_counter()
        _compile(directory)
        logger.info("fused CPU kernels built in %.0f s", time.perf_counter() - start)
        return True
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError) as exc:
        lines = str(exc).strip().splitlines()
        reason = lines[-1] if lines else type(exc).__name__
        logger.warning("fused CPU kernels could not be built (%s); %s", reason, _FALLBACK)
        return False


def prebuild() -> Path:
    """Compile the library into the installed package (`PREBUILT_ROOT`), where `build_and_load`
    finds it on a machine without a compiler; returns its path. Raises what the build raised."""
    missing = _missing_tools()
    if missing is not None:
        raise RuntimeError(f"cannot prebuild the fused CPU kernels: {missing}")
    library = library_in(PREBUILT_ROOT / _build_key())
    library.parent.mkdir(parents=True, exist_ok=True)
    _compile(library.parent)
    for leftover in library.parent.iterdir():  # objects and the ninja file: only the library ships
        if leftover != library:
            leftover.unlink()
    return library


def _compile(directory: Path) -> None:
    """Compile the sources into `directory`/`_NAME`.so and load it."""
    cpp_extension.load(
        name=_NAME,
        sources=[str(source) for source in _SOURCES],
        extra_cflags=list(_CFLAGS),
        extra_ldflags=list(_LDFLAGS),
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
    )


def best_isa() -> str:
    """The fastest path this CPU runs (the extension must be loaded)."""
    number = int(torch.ops.gpt_oss_cpu.best_isa())
    return next(name for name, n in ISAS.items() if n == number)


def supported_isas() -> list[str]:
    """Every path this CPU runs, slowest first."""
    best = ISAS[best_isa()]
    return [name for name, n in ISAS.items() if n <= best]


def _isa_number(isa: str) -> int:
    if isa == "auto":
        return ISAS[best_isa()]
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}; expected auto or one of {', '.join(ISAS)}")
    return ISAS[isa]


def mxfp4_linear(
    x: torch.Tensor,
    blocks: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    isa: str = "auto",
) -> torch.Tensor:
    """x [T, cols] @ W.T (+ bias) with W [rows, cols] packed as MXFP4 -> [T, rows] float32."""
    return torch.ops.gpt_oss_cpu.mxfp4_linear(x, blocks, scales, bias, _isa_number(isa))


def moe(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    mlp1: Mxfp4Experts,
    mlp2: Mxfp4Experts,
    top_k: int,
    swiglu_alpha: float,
    swiglu_limit: float,
    *,
    isa: str = "auto",
) -> torch.Tensor:
    """`reference.moe` with the experts fused in C++: same routing, same result (to fp32 rounding)."""
    logits = linear(x, router_weight, router_bias)  # [T, E]: the reference's route, same ops
    top_logits, experts = torch.topk(logits, top_k, dim=-1, sorted=True)
    weights = torch.softmax(top_logits.float(), dim=-1)
    return torch.ops.gpt_oss_cpu.moe_experts(
        x, experts, weights, mlp1.blocks, mlp1.scales, mlp1.bias, mlp2.blocks, mlp2.scales,
        mlp2.bias, swiglu_alpha, swiglu_limit, _isa_number(isa),
    )  # fmt: skip


# An expert with this many tokens in a step goes through decoded weight tiles and PyTorch's matmul
# (mirrors kDenseMinTokens in csrc/mxfp4_cpu.cpp; tests use it to know which path ran).
DENSE_MIN_TOKENS = 16

# The bf16 matrix-vector kernel covers up to this many tokens (decode steps); more go to PyTorch
# (oneDNN, on AMX where present), which is compute-bound there and does better.
MAX_LINEAR_TOKENS = 4


@functools.cache
def _linear_supported() -> bool:
    return bool(torch.ops.gpt_oss_cpu.linear_supported())


@functools.cache
def linear_bf16_dot_supported() -> bool:
    """Whether this CPU has AVX512-BF16, which the matmul kernel uses for its products (vdpbf16ps)
    unless told otherwise (the extension must be loaded)."""
    return bool(torch.ops.gpt_oss_cpu.linear_bf16_dot_supported())


def _streams(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether the streaming C++ kernel takes this: bf16, 1..4 tokens, AVX-512."""
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= MAX_LINEAR_TOKENS
        and x.dtype == torch.bfloat16
        and all(w.dtype == torch.bfloat16 for w in weights)
        and _linear_supported()
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bf16_dot: bool | None = None,
) -> torch.Tensor:
    """`F.linear`; bf16 x of 1..4 tokens with a bf16 weight goes to the streaming C++ kernel
    (`bf16_dot`: whether it multiplies with vdpbf16ps; None: where the CPU has it)."""
    if _streams(x, (weight,)):
        dot = linear_bf16_dot_supported() if bf16_dot is None else bf16_dot
        return torch.ops.gpt_oss_cpu.linear(x, weight, bias, dot)
    return F.linear(x, weight, bias)


def linear_many(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    *,
    bf16_dot: bool | None = None,
) -> tuple[torch.Tensor, ...]:
    """`reference.linear_many`: for decode steps, all the weights in one streaming pass."""
    if _streams(x, weights):
        dot = linear_bf16_dot_supported() if bf16_dot is None else bf16_dot
        return tuple(torch.ops.gpt_oss_cpu.linear_many(x, list(weights), list(biases), dot))
    return reference.linear_many(x, weights, biases)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`reference.rms_norm` in one call."""
    return torch.ops.gpt_oss_cpu.rms_norm(x, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`reference.apply_rope` in one call (bit-identical: the same roundings in x's dtype)."""
    return torch.ops.gpt_oss_cpu.apply_rope(x, cos, sin)


# Chunks up to this many tokens are attended in C++ (decodes, short chunks); longer ones (prefill)
# by the reference's batched matmuls, which beat a per-query loop there.
MAX_FUSED_QUERIES = 16


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sinks: torch.Tensor,
    group: CacheGroupBatch,
    query_lens: tuple[int, ...],
    seq_lens: tuple[int, ...],
    window: int | None,
    sm_scale: float,
) -> torch.Tensor:
    """`reference.paged_attention`: K/V written to the cache, then attention read through the block
    tables in place (fp32 scores, softmax and sums; no gathered copy of the keys)."""
    n_tokens, n_heads, head_dim = q.shape
    out = torch.ops.gpt_oss_cpu.paged_attention(
        q, k, v, k_cache, v_cache, sinks, group.slot_mapping, group.block_tables,
        list(query_lens), list(seq_lens), window or 0, sm_scale, MAX_FUSED_QUERIES,
    )  # fmt: skip
    start = 0
    for i, n_q in enumerate(query_lens):
        if n_q > MAX_FUSED_QUERIES:
            table = group.block_tables[i : i + 1]
            out[start : start + n_q] = reference.attend(
                q[start : start + n_q], k_cache, v_cache, sinks, table, [seq_lens[i]], n_q,
                window, sm_scale,
            )  # fmt: skip
        start += n_q
    return out.view(n_tokens, n_heads * head_dim)


def read_probe(buffer: torch.Tensor) -> float:
    """Read every byte of `buffer` with all threads, as the kernels read (benchmarks time it)."""
    return float(torch.ops.gpt_oss_cpu.read_probe(buffer))
