"""Speed and memory of the gpt-oss forward on the CPU, beside the machine's bandwidth ceiling.

On a random checkpoint with the exact gpt-oss-20b shapes (generated on first use: ~13 GB on disk,
Hugging Face layout, experts MXFP4) it measures load time, prefill tokens/s for a 512-token prompt,
decode tokens/s at batch 1 and batch 4 (best of 3 rounds of 32 steps: the machines are shared)
and the peak resident memory of the whole run, with a KV cache for 8192 tokens allocated as a
server would. Next to each decode figure: the ceiling set by memory bandwidth, the bytes the steps
read (dense weights, the distinct experts each step selected, its KV) over the read bandwidth
measured right before and after those very steps (the median of six full reads of the mapped
unembedding matrix, 1.16 GB: the memory the kernels read, in the same page state; this VM's
bandwidth swings from ~28 to ~48 GB/s within minutes, so a probe taken at another moment of the
run would not describe the round).

    python benchmarks/model_cpu.py [--checkpoint DIR] [--preset gpt-oss-20b] [--backend auto]
        [--decode-steps 32] [--rounds 3] [--batch 1 4] [--threads N] [--kv-tokens 8192]
        [--keep-page-cache]

Without --checkpoint it uses (and if needed writes) /tmp/gpt-oss-random/<preset>. The figures
print as a Markdown table (docs/benchmarks.md keeps the measured ones).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import FULL, SLIDING, preset
from engine.engine import EngineConfig, sliding_pool_blocks
from engine.host_memory import release_large_frees_to_os
from engine.kernels import Kernels, cpu, reference
from engine.model.forward_batch import SequenceChunk, build_forward_batch
from engine.model.gpt_oss import GptOss
from engine.model.random_checkpoint import write_random_checkpoint
from engine.model.weights import GptOssWeights, Mxfp4Experts

BLOCK = 16


def rss_gib() -> float:
    """Current resident set size (file-backed mapped pages included)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def cpu_name() -> str:
    """The CPU's model name (the machines of one kind are not all the same CPU)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class BandwidthProbe:
    """Full reads of a tensor far larger than the last-level cache (the model's own mapped
    weights: no extra memory, and the same pages the kernels stream), by the kernels' read loop
    when they are built (AVX-512 loads, prefetching as the kernels do), else by an int64 sum."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor.contiguous()
        self.nbytes = self.tensor.numel() * self.tensor.element_size()
        if cpu.load():
            self.how = "the kernels' read loop"
            self._read = lambda: cpu.read_probe(self.tensor)
        else:
            words = self.tensor.view(-1).view(torch.uint8)[: self.nbytes // 8 * 8].view(torch.int64)
            self.how = "an int64 sum"
            self._read = lambda: float(words.sum())
        self.readings: list[float] = []

    def read_gbs(self, reads: int = 3) -> list[float]:
        """GB/s of `reads` full reads (also kept in `readings`)."""
        out = []
        for _ in range(reads):
            start = time.perf_counter()
            self._read()
            out.append(self.nbytes / (time.perf_counter() - start) / 1e9)
        self.readings += out
        return out


def refresh_page_cache(directory: Path) -> float:
    """Evict the checkpoint's files from the page cache and read them back sequentially; seconds.

    The page cache then holds them as after a cold start: read ahead from disk in large folios,
    which the mapping maps with 2 MB entries. Files still cached from being written sit in 4 KB
    pages, and the decode steps read them 20-30% slower here (TLB walks are costly in a VM).
    """
    start = time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while os.read(fd, 16 << 20):
                pass
        finally:
            os.close(fd)
    return time.perf_counter() - start


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def dense_bytes_per_step(w: GptOssWeights) -> int:
    """Weights every decode step reads whatever its batch: attention, router, norms, unembedding
    (the embedding is a gather of one row per token)."""
    total = nbytes(w.norm, w.unembedding)
    for layer in w.layers:
        a, m = layer.attn, layer.moe
        total += nbytes(a.norm, a.q_weight, a.q_bias, a.k_weight, a.k_bias, a.v_weight, a.v_bias)
        total += nbytes(a.sinks, a.o_weight, a.o_bias, m.norm, m.router_weight, m.router_bias)
    return total


def expert_bytes(w: GptOssWeights) -> int:
    """One expert of one layer: both matmuls' blocks, scales and bias rows."""

    def one(x: Mxfp4Experts) -> int:
        return nbytes(x.blocks[0], x.scales[0], x.bias[0])

    moe = w.layers[0].moe
    return one(moe.mlp1) + one(moe.mlp2)


def kv_bytes_per_step(model: GptOss, seq_lens: list[int]) -> int:
    """K and V every layer reads for these sequences (a sliding layer: its window at most)."""
    c = model.config
    per_token = 2 * c.num_key_value_heads * c.head_dim * model.dtype.itemsize
    total = 0
    for layer_type in c.layer_types:
        window = c.sliding_window if layer_type == SLIDING else None
        total += sum(min(n, window) if window else n for n in seq_lens) * per_token
    return total


def counting_experts(kernels: Kernels, counts: list[int]) -> Kernels:
    """The same kernels, recording how many distinct experts each MoE call selects."""

    def moe(x, router_weight, router_bias, mlp1, mlp2, top_k, *args, **kwargs):
        _, experts = reference.route(x, router_weight, router_bias, top_k)
        counts.append(int(experts.unique().numel()))
        return kernels.moe(x, router_weight, router_bias, mlp1, mlp2, top_k, *args, **kwargs)

    return dataclasses.replace(kernels, moe=moe)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--backend", default="auto", choices=["auto", "cpu", "reference"])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="decode rounds per batch size")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--kv-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--keep-page-cache",
        action="store_true",
        help="do not evict and re-read the checkpoint first (see refresh_page_cache)",
    )
    args = parser.parse_args()
    if args.prompt_len % BLOCK:
        parser.error(f"--prompt-len must be a multiple of {BLOCK} (its blocks are shared)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    release_large_frees_to_os()

    directory = args.checkpoint or Path("/tmp/gpt-oss-random") / args.preset
    if not (directory / "config.json").is_file():
        print(f"writing a random {args.preset} checkpoint to {directory} (one time)...")
        start = time.perf_counter()
        write_random_checkpoint(directory, preset(args.preset), layout="hf", seed=0)
        print(f"  written in {time.perf_counter() - start:.0f} s")
    if args.backend != "reference":
        cpu.load()  # a first-ever build is not load time
    if not args.keep_page_cache:
        print(
            f"page cache refreshed (checkpoint read from disk) in {refresh_page_cache(directory):.0f} s"
        )

    start = time.perf_counter()
    model = GptOss.from_checkpoint(directory, dtype=torch.bfloat16, backend=args.backend)
    load_s = time.perf_counter() - start
    rss_after_load = rss_gib()
    expert_counts: list[int] = []
    model.kernels = counting_experts(model.kernels, expert_counts)

    # The KV cache a server with --kv-tokens would allocate; sequences use blocks from 1 on.
    c = model.config
    n_full = -(-args.kv_tokens // BLOCK) + 1
    n_sliding = sliding_pool_blocks(EngineConfig(max_num_seqs=max(args.batch)), c.sliding_window)
    n_seq_blocks = -(-(args.prompt_len + 2 + args.rounds * args.decode_steps) // BLOCK)
    needed = args.prompt_len // BLOCK + max(args.batch) * (n_seq_blocks - args.prompt_len // BLOCK)
    cache = model.new_kv_cache({FULL: n_full, SLIDING: max(n_sliding, needed + 1)}, BLOCK)
    # The prompt's full blocks are shared by every sequence of a batch, as prefix caching would.
    shared = list(range(1, args.prompt_len // BLOCK + 1))
    next_block = len(shared) + 1
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, c.vocab_size, (args.prompt_len,), generator=generator)
    prompt_tables = {FULL: shared, SLIDING: shared}

    def prefill() -> None:
        batch = build_forward_batch([SequenceChunk(prompt.tolist(), 0, prompt_tables)], BLOCK)
        model.compute_logits(model.forward(batch, cache)[batch.logits_indices])

    prefill_s = timed(prefill)

    probe = BandwidthProbe(model.weights.unembedding)
    probe.read_gbs(1)  # page in, not counted
    probe.readings.clear()
    # batch -> (seconds, bytes read, GB/s read by the probe around that round)
    measured: dict[int, tuple[float, int, float]] = {}
    rounds: dict[int, list[float]] = {}  # batch -> tok/s of every round
    for n_seqs in args.batch:
        tables = []
        for _ in range(n_seqs):
            own = list(range(next_block, next_block + n_seq_blocks - len(shared)))
            next_block += len(own)
            tables.append({FULL: shared + own, SLIDING: shared + own})
        tokens = list(range(1, n_seqs + 1))  # different first tokens: different experts
        expert_counts.clear()
        bytes_read = 0

        def step(i: int, tokens: list[int] = tokens, tables: list = tables) -> list[int]:
            nonlocal bytes_read
            chunks = [
                SequenceChunk([t], args.prompt_len + i, table)
                for t, table in zip(tokens, tables, strict=True)
            ]
            batch = build_forward_batch(chunks, BLOCK)
            bytes_read += kv_bytes_per_step(model, list(batch.seq_lens))
            logits = model.compute_logits(model.forward(batch, cache))
            return logits.argmax(-1).tolist()

        for i in range(2):  # warm-up: page in and settle (not timed)
            tokens[:] = step(i)
        position = 2
        for round_ in range(args.rounds):  # the machine is shared: the best round counts
            before = probe.read_gbs()
            expert_counts.clear()
            bytes_read = 0
            start = time.perf_counter()
            for i in range(position, position + args.decode_steps):
                tokens[:] = step(i)
            elapsed = time.perf_counter() - start
            around = statistics.median(before + probe.read_gbs())
            position += args.decode_steps
            bytes_read += dense_bytes_per_step(model.weights) * args.decode_steps
            bytes_read += sum(expert_counts) * expert_bytes(model.weights)
            tok_s = n_seqs * args.decode_steps / elapsed
            rounds.setdefault(n_seqs, []).append(tok_s)
            ceiling = n_seqs * args.decode_steps / (bytes_read / (around * 1e9))
            if n_seqs not in measured or elapsed < measured[n_seqs][0]:
                measured[n_seqs] = (elapsed, bytes_read, around)
            print(
                f"batch {n_seqs}, round {round_ + 1}: {tok_s:.2f} tok/s, "
                f"probe {around:.1f} GB/s, {tok_s / ceiling:.0%} of that ceiling"
            )

    peak_rss = peak_rss_gib()
    decode: dict[int, tuple[float, float, float]] = {}  # batch -> (tok/s, GB/s, ceiling tok/s)
    for n_seqs, (seconds, bytes_read, bandwidth) in measured.items():
        tokens = n_seqs * args.decode_steps
        ceiling = tokens / (bytes_read / (bandwidth * 1e9))
        decode[n_seqs] = (tokens / seconds, bandwidth, ceiling)
        print(f"batch {n_seqs}: {bytes_read / tokens / 1e9:.2f} GB read per token")
    print(
        f"\n{model.kernels.name} kernels, {args.preset} shapes, bf16, {args.threads} threads, "
        f"{cpu_name()}, {datetime.date.today()}\n"
    )
    readings = probe.readings
    print("| measure | value | bandwidth ceiling | of ceiling |")
    print("|---|---:|---:|---:|")
    print(
        f"| read bandwidth ({probe.nbytes / 1e9:.2f} GB of mapped weights, {probe.how}; "
        f"{len(readings)} reads) | median {statistics.median(readings):.1f} GB/s "
        f"({min(readings):.1f}-{max(readings):.1f}) | | |"
    )
    print(f"| load time (mmap) | {load_s:.2f} s | | |")
    print(f"| RSS after load | {rss_after_load:.2f} GiB | | |")
    print(
        f"| prefill, {args.prompt_len}-token prompt | {args.prompt_len / prefill_s:.2f} tok/s | | |"
    )
    for n_seqs, (tok_s, bandwidth, ceiling) in decode.items():
        print(
            f"| decode, batch {n_seqs} (best of {args.rounds} x {args.decode_steps} steps; "
            f"probe around it {bandwidth:.1f} GB/s) | {tok_s:.2f} tok/s "
            f"| {ceiling:.2f} tok/s | {tok_s / ceiling:.0%} |"
        )
    print(f"| peak RSS (KV cache for {args.kv_tokens} tokens) | {peak_rss:.2f} GiB | | |")
    for n_seqs, rates in rounds.items():
        listed = ", ".join(f"{r:.2f}" for r in rates)
        print(
            f"\ndecode, batch {n_seqs}, every round: {listed} tok/s (mean {statistics.mean(rates):.2f})"
        )


if __name__ == "__main__":
    main()
