"""Offline throughput and latency of the whole engine, driven through the server's door.

For each concurrency level it builds a fresh `LLMEngine` + `AsyncEngine` (fresh stats, fresh KV cache)
around one loaded model and runs closed-loop clients: `concurrency` asyncio tasks, each calling
`AsyncEngine.generate()` back to back until `--num-requests` requests are done. Prompts are fixed
random token ids (seeded, a different prompt per request so the prefix cache does not help); every
request decodes greedily exactly `--output-len` tokens (`max_tokens = min_tokens = O`, no stop
tokens). Per request it records the TTFT (from the generate() call to the first token) and the
inter-token latencies (gaps between successive token outputs); per level it prints requests/s,
output tokens/s, TTFT and ITL p50/p90/p99 in ms and the level's wall time, and at the end each
level's output tokens/s relative to concurrency 1. Throughput must grow with concurrency
(continuous batching): on the tiny model concurrency 16 should give at least 4x concurrency 1.

    python benchmarks/engine_throughput.py --preset tiny
    python benchmarks/engine_throughput.py --preset gpt-oss-20b --concurrency 1 4 --output-len 2
    python benchmarks/engine_throughput.py --preset tiny|gpt-oss-20b [--checkpoint DIR]
        [--concurrency 1 4 16 64] [--num-requests N] [--prompt-len L] [--output-len O]
        [--dtype bfloat16|float32] [--kv-cache-tokens T] [--max-num-batched-tokens B]
        [--threads N] [--warmup W]

Without --checkpoint it uses (and on first use writes) a random checkpoint in
/tmp/gpt-oss-random/<preset>. Defaults: tiny: float32, prompt 64, output 32, max(64, 4 x
concurrency) requests per level, 1 torch thread (its ops are too small to split; see DEFAULTS);
gpt-oss-20b: bfloat16, prompt 32, output 4, one request per client (= concurrency), all torch
threads, since a 20b step with the reference MoE kernels takes seconds. Unless given,
max_num_seqs = concurrency and max_num_batched_tokens = concurrency x prompt (every prompt of a
burst prefills in one step, no chunking); the printout says which applies.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import logging
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.async_engine import AsyncEngine
from engine.config import DTYPES, preset
from engine.engine import EngineConfig, LLMEngine
from engine.model.gpt_oss import GptOss
from engine.model.random_checkpoint import write_random_checkpoint
from engine.sampler import SamplingParams

log = logging.getLogger("engine_throughput")

RANDOM_ROOT = Path("/tmp/gpt-oss-random")
BLOCK_SIZE = 16
# Per preset: dtype, prompt length, output length, requests per level (from the concurrency),
# torch threads (None: torch's default). The tiny model's ops are too small to split across threads,
# and an OpenMP team of 2 on a busy 2-core machine stalls each op until both threads get a core:
# tiny runs with one thread are ~2x faster and far steadier than with two.
DEFAULTS = {
    "tiny": ("float32", 64, 32, lambda c: max(64, 4 * c), 1),
    "gpt-oss-20b": ("bfloat16", 32, 4, lambda c: c, None),
}


# --- measurement -----------------------------------------------------------------------------------
@dataclass(slots=True)
class RequestRecord:
    ttft_s: float
    itl_s: list[float]
    num_output_tokens: int
    finish_reason: str | None


@dataclass(slots=True)
class LevelResult:
    concurrency: int
    num_requests: int
    wall_s: float
    records: list[RequestRecord] = field(default_factory=list)
    chunked: bool = False
    max_num_batched_tokens: int = 0
    num_preemptions: int = 0

    @property
    def output_tokens(self) -> int:
        return sum(r.num_output_tokens for r in self.records)

    @property
    def requests_per_s(self) -> float:
        return len(self.records) / self.wall_s

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def num(x: float) -> str:
    """A rate or time with 4 significant digits at any scale (20b levels run at ~0.01 tok/s)."""
    if math.isnan(x):
        return "nan"
    return f"{x:.1f}" if abs(x) >= 1000 else f"{x:.4g}"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Progress:
    """tqdm when it is importable, else a log line every ~10% (or 10 s) of a level."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.done = total, desc, 0
        self.started = self.last_log = time.perf_counter()
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc=desc, unit="req", leave=False, dynamic_ncols=True)

    def update(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            return
        now = time.perf_counter()
        step = max(1, self.total // 10)
        if self.done == self.total or self.done % step == 0 or now - self.last_log > 10:
            self.last_log = now
            log.info(
                "%s: %d/%d requests (%.1f s)", self.desc, self.done, self.total, now - self.started
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=generator).tolist()


async def run_clients(
    engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, concurrency: int
) -> tuple[list[RequestRecord], float]:
    """Closed-loop clients: each takes the next prompt as soon as its previous request finished."""
    records: list[RequestRecord] = []
    next_index = iter(range(len(prompts)))
    progress = Progress(len(prompts), f"concurrency {concurrency}")

    async def client() -> None:
        for i in next_index:  # shared iterator: asyncio is single-threaded, no lock needed
            started = time.perf_counter()
            last = started
            ttft = math.nan
            itl: list[float] = []
            n_out = 0
            finish = None
            async for output in engine.generate(prompts[i], params):
                if output.error is not None:
                    raise RuntimeError(f"request {output.request_id} failed: {output.error}")
                if output.new_token_ids:
                    now = time.perf_counter()
                    if n_out == 0:
                        ttft = now - started
                    else:
                        itl.append(now - last)
                    last = now
                    n_out += len(output.new_token_ids)
                finish = output.finish_reason
            records.append(RequestRecord(ttft, itl, n_out, None if finish is None else str(finish)))
            progress.update()

    started = time.perf_counter()
    try:
        await asyncio.gather(*(client() for _ in range(concurrency)))
    finally:
        progress.close()
    return records, time.perf_counter() - started


def engine_config(args: argparse.Namespace, concurrency: int) -> EngineConfig:
    per_request = args.prompt_len + args.output_len
    kv_tokens = (
        args.kv_cache_tokens or concurrency * (-(-per_request // BLOCK_SIZE) + 1) * BLOCK_SIZE
    )
    return EngineConfig(
        block_size=BLOCK_SIZE,
        kv_cache_tokens=kv_tokens,
        max_num_seqs=concurrency,
        max_num_batched_tokens=args.max_num_batched_tokens or concurrency * args.prompt_len,
        seed=args.seed,
    )


def warm_up(model: GptOss, args: argparse.Namespace, vocab: int) -> None:
    """A throwaway engine runs a few requests so one-time costs do not land in the first level."""
    engine = LLMEngine(model, engine_config(args, 2))
    params = SamplingParams(temperature=0, max_tokens=2, min_tokens=2)
    for i, prompt in enumerate(make_prompts(args.warmup, args.prompt_len, vocab, args.seed + 1)):
        engine.add_request(f"warmup-{i}", prompt, params)
    while engine.has_work:
        engine.step()


def run_level(
    model: GptOss, args: argparse.Namespace, concurrency: int, prompts: list[list[int]]
) -> LevelResult:
    config = engine_config(args, concurrency)
    engine = AsyncEngine(LLMEngine(model, config))
    params = SamplingParams(
        temperature=0, max_tokens=args.output_len, min_tokens=args.output_len, stop_token_ids=()
    )
    try:
        records, wall_s = asyncio.run(run_clients(engine, prompts, params, concurrency))
        stats = engine.engine.stats()
    finally:
        engine.shutdown()
    return LevelResult(
        concurrency,
        len(prompts),
        wall_s,
        records,
        chunked=config.max_num_batched_tokens < concurrency * args.prompt_len,
        max_num_batched_tokens=config.max_num_batched_tokens,
        num_preemptions=stats.num_preemptions,
    )


# --- report ----------------------------------------------------------------------------------------
def print_table(results: list[LevelResult]) -> None:
    print(
        "| concurrency | requests | wall s | req/s | output tok/s "
        "| TTFT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms | prefill | preempt |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in results:
        ttft = [x.ttft_s * 1e3 for x in r.records]
        itl = [g * 1e3 for x in r.records for g in x.itl_s]
        ttft_s = " / ".join(f"{percentile(ttft, q):.1f}" for q in (50, 90, 99))
        itl_s = " / ".join(f"{percentile(itl, q):.1f}" for q in (50, 90, 99))
        prefill = f"chunked ({r.max_num_batched_tokens})" if r.chunked else "one step"
        print(
            f"| {r.concurrency} | {len(r.records)} | {r.wall_s:.2f} | {num(r.requests_per_s)} "
            f"| {num(r.output_tokens_per_s)} | {ttft_s} | {itl_s} | {prefill} "
            f"| {r.num_preemptions} |"
        )


def print_scaling(results: list[LevelResult], preset_name: str) -> None:
    base = next((r for r in results if r.concurrency == 1), results[0])
    print(f"\noutput tok/s relative to concurrency {base.concurrency}:")
    for r in results:
        ratio = r.output_tokens_per_s / base.output_tokens_per_s
        print(f"  concurrency {r.concurrency:>3}: {ratio:5.2f}x")
    c16 = next((r for r in results if r.concurrency == 16), None)
    if preset_name == "tiny" and base.concurrency == 1 and c16 is not None:
        ratio = c16.output_tokens_per_s / base.output_tokens_per_s
        verdict = "PASS" if ratio >= 4 else "FAIL"
        print(f"  continuous batching (tiny: concurrency 16 >= 4x concurrency 1): {verdict}")


# --- main ------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(DEFAULTS))
    parser.add_argument("--checkpoint", type=Path, help="default: /tmp/gpt-oss-random/<preset>")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--num-requests", type=int, help="per level (default: per preset)")
    parser.add_argument("--prompt-len", type=int)
    parser.add_argument("--output-len", type=int)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"))
    parser.add_argument("--kv-cache-tokens", type=int, help="default: what the level needs")
    parser.add_argument("--max-num-batched-tokens", type=int, help="default: concurrency x prompt")
    parser.add_argument("--warmup", type=int, help="warm-up requests (default: tiny 4, 20b 0)")
    parser.add_argument("--threads", type=int, help="torch threads (default: tiny 1, 20b all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dtype_name, prompt_len, output_len, requests_for, threads = DEFAULTS[args.preset]
    args.threads = args.threads or threads or torch.get_num_threads()
    torch.set_num_threads(args.threads)
    args.dtype = args.dtype or dtype_name
    args.prompt_len = args.prompt_len or prompt_len
    args.output_len = args.output_len or output_len
    if args.warmup is None:
        args.warmup = 4 if args.preset == "tiny" else 0

    directory = args.checkpoint or RANDOM_ROOT / args.preset
    if not (directory / "config.json").is_file():
        if args.checkpoint is not None:
            parser.error(f"{directory} has no config.json")
        print(f"writing a random {args.preset} checkpoint to {directory} (one time)...")
        start = time.perf_counter()
        write_random_checkpoint(directory, preset(args.preset), layout="hf", seed=0)
        print(f"  written in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    model = GptOss.from_checkpoint(directory, dtype=DTYPES[args.dtype])
    print(f"loaded {directory} ({args.dtype}) in {time.perf_counter() - start:.1f} s")
    vocab = model.config.vocab_size
    if args.warmup:
        start = time.perf_counter()
        warm_up(model, args, vocab)
        print(f"warm-up ({args.warmup} requests) in {time.perf_counter() - start:.1f} s")

    results = []
    for concurrency in args.concurrency:
        n = args.num_requests or requests_for(concurrency)
        prompts = make_prompts(n, args.prompt_len, vocab, args.seed)
        result = run_level(model, args, concurrency, prompts)
        short = [r for r in result.records if r.num_output_tokens != args.output_len]
        if short:
            log.warning("%d requests did not produce %d tokens", len(short), args.output_len)
        prefill = "chunked" if result.chunked else "no chunking"
        print(
            f"concurrency {concurrency}: {n} requests in {result.wall_s:.1f} s, "
            f"{num(result.output_tokens_per_s)} output tok/s (max_num_seqs {concurrency}, "
            f"max_num_batched_tokens {result.max_num_batched_tokens}: {prefill})"
        )
        results.append(result)

    print(
        f"\nengine throughput, {args.preset} ({directory}), {args.dtype}, "
        f"{model.kernels.name} kernels, prompt {args.prompt_len}, output {args.output_len}, "
        f"greedy, torch threads {args.threads}, {platform.processor() or platform.machine()}, "
        f"{datetime.date.today()}\n"
    )
    print_table(results)
    print_scaling(results, args.preset)


if __name__ == "__main__":
    main()
