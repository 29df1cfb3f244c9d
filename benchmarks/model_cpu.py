"""Baseline speed and memory of the gpt-oss forward with the reference kernels on the CPU.

On a random checkpoint with the exact gpt-oss-20b shapes (generated on first use: ~13 GB on disk,
Hugging Face layout, experts MXFP4) it measures load time, resident memory, prefill tokens/s for a
512-token prompt and decode tokens/s at batch 1. These are the figures the faster CPU and GPU
kernels are measured against.

    python benchmarks/model_cpu.py [--checkpoint DIR] [--preset gpt-oss-20b] [--decode-steps 8]

Without --checkpoint it uses (and if needed writes) /tmp/gpt-oss-random/<preset>.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import resource
import time
from pathlib import Path

import torch

from engine.config import FULL, SLIDING, preset
from engine.host_memory import release_large_frees_to_os
from engine.model.forward_batch import SequenceChunk, build_forward_batch
from engine.model.gpt_oss import GptOss
from engine.model.random_checkpoint import write_random_checkpoint

BLOCK = 16


def rss_gib() -> float:
    """Current resident set size (file-backed mapped pages included)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path)
    parser.add_argument("--preset", default="gpt-oss-20b")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    release_large_frees_to_os()

    directory = args.checkpoint or Path("/tmp/gpt-oss-random") / args.preset
    if not (directory / "config.json").is_file():
        print(f"writing a random {args.preset} checkpoint to {directory} (one time)...")
        start = time.perf_counter()
        write_random_checkpoint(directory, preset(args.preset), layout="hf", seed=0)
        print(f"  written in {time.perf_counter() - start:.0f} s")

    start = time.perf_counter()
    model = GptOss.from_checkpoint(directory, dtype=torch.bfloat16)
    load_s = time.perf_counter() - start
    rss_after_load = rss_gib()

    n_total = args.prompt_len + args.decode_steps
    n_blocks = -(-n_total // BLOCK)
    cache = model.new_kv_cache({FULL: n_blocks + 1, SLIDING: n_blocks + 1}, BLOCK)
    tables = {FULL: list(range(1, n_blocks + 1)), SLIDING: list(range(1, n_blocks + 1))}
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (args.prompt_len,), generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    batch = build_forward_batch([SequenceChunk(prompt.tolist(), 0, tables)], BLOCK)
    hidden = model.forward(batch, cache)
    token = int(model.compute_logits(hidden[batch.logits_indices]).argmax(-1))
    prefill_s = time.perf_counter() - start

    start = time.perf_counter()
    for step in range(args.decode_steps):
        chunk = SequenceChunk([token], args.prompt_len + step, tables)
        batch = build_forward_batch([chunk], BLOCK)
        token = int(model.compute_logits(model.forward(batch, cache)).argmax(-1))
    decode_s = time.perf_counter() - start

    print(
        f"\nreference kernels, {args.preset} shapes, bf16, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, {datetime.date.today()}\n"
    )
    print("| measure | value |")
    print("|---|---:|")
    print(f"| load time | {load_s:.2f} s |")
    print(f"| RSS after load | {rss_after_load:.2f} GiB |")
    print(f"| prefill, {args.prompt_len}-token prompt | {args.prompt_len / prefill_s:.2f} tok/s |")
    print(
        f"| decode, batch 1 ({args.decode_steps} steps) | {args.decode_steps / decode_s:.3f} tok/s |"
    )
    print(f"| peak RSS | {peak_rss_gib():.2f} GiB |")


if __name__ == "__main__":
    main()
