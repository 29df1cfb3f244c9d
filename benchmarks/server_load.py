"""The HTTP layer's own cost: streaming clients through the server beside the engine driven directly.

At each concurrency (default 1, 8 and 32 clients) it runs closed-loop clients twice on one loaded
tiny random model: once as HTTP clients streaming `POST /v1/completions` from the in-process server
on loopback, once as coroutines calling `services.engine.generate` on the very same engine. Every
request has a random token-id prompt and decodes greedily exactly `--output-len` tokens
(`max_tokens = min_tokens = O`, no stop tokens or strings: a raw completion adds none), so both
sides do identical engine work. It prints requests/s and output tokens/s for each and their ratio:
the front end must never be the bottleneck (goal: HTTP >= 90% of engine-direct at 32 clients).

Both modes use the same engine kind (`--engine`): `process` (the default, as the server runs it:
the engine core in a child process with its own GIL) or `thread` (the core in a thread of the
server process). With `process` the child's CPU time per output token is shown beside the server's.

The HTTP clients (httpx.AsyncClient) run in a separate process by default, as real clients do, so
their own SSE parsing does not take the server's GIL (`--clients in-process` to compare). Each
mode gets fresh prompts of the same shape in every round, so neither reuses the other's prefix
cache; rounds alternate the modes and the best round of each is shown (`--rounds`), since a small
shared machine is noisy. The last column, the server process's CPU time per output token (engine,
event loop and, engine-direct, the client coroutines), is steadier than rates on a busy machine:
its difference between the modes is what the HTTP layer costs per streamed token.

    python benchmarks/server_load.py
    python benchmarks/server_load.py [--concurrency 1 8 32] [--prompt-len 64] [--output-len 64]
        [--num-requests N] [--rounds 2] [--engine process|thread] [--clients subprocess|in-process]
        [--http auto|h11|httptools] [--loop auto|asyncio|uvloop] [--threads 1]

The checkpoint is written on first use to /tmp/gpt-oss-random/tiny-server (the tests' tiny preset
and synthetic harmony tokenizer).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import multiprocessing
import os
import platform
import random
import socket
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("server_load")

MODEL_DIR = Path("/tmp/gpt-oss-random/tiny-server")
MODEL_NAME = "tiny-server"
PROMPT_VOCAB = 256  # byte tokens: ids every vocabulary has


@dataclass(frozen=True, slots=True)
class Result:
    mode: str
    concurrency: int
    requests: int
    output_tokens: int
    wall_s: float
    cpu_s: float  # CPU time of this process (server, engine and in-process clients) in the run
    client_cpu_s: float = 0.0  # CPU time of the client process, when the clients have their own
    engine_cpu_s: float = 0.0  # CPU time of the engine process, when the engine has its own

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def cpu_us_per_token(self) -> float:
        """CPU of the server process per output token: robust to a busy machine's stolen time."""
        return 1e6 * self.cpu_s / self.output_tokens

    @property
    def engine_cpu_us_per_token(self) -> float:
        return 1e6 * self.engine_cpu_s / self.output_tokens


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of another process so far (Linux /proc; 0 where there is none)."""
    stat = Path(f"/proc/{pid}/stat")
    if pid is None or not stat.exists():
        return 0.0
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_prompts(n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(PROMPT_VOCAB) for _ in range(length)] for _ in range(n)]


# --- the two kinds of clients ----------------------------------------------------------------------
async def http_clients(
    base_url: str, prompts: list[list[int]], output_len: int, concurrency: int
) -> tuple[int, float]:
    """Closed-loop streaming clients; returns (output tokens, from each stream's usage; wall s)."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    todo = iter(prompts)
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        for prompt in todo:  # shared iterator: one event loop, no lock needed
            body = {
                "model": MODEL_NAME,
                "prompt": prompt,
                "max_tokens": output_len,
                "min_tokens": output_len,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with http.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and '"usage": {' in line:
                        tokens += json.loads(line[6:])["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return tokens, time.perf_counter() - started


def http_clients_blocking(
    base_url: str, prompts: list[list[int]], output_len: int, concurrency: int
) -> tuple[int, float, float]:
    """The HTTP clients on their own event loop (the client process's entry point); + CPU s."""
    cpu = time.process_time()
    tokens, wall = asyncio.run(http_clients(base_url, prompts, output_len, concurrency))
    return tokens, wall, time.process_time() - cpu


async def engine_clients(
    engine: Any, prompts: list[list[int]], params: Any, concurrency: int
) -> tuple[int, float]:
    """The same closed-loop clients, calling the engine's door directly."""
    todo = iter(prompts)
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        for prompt in todo:
            last = None
            async for output in engine.generate(prompt, params):
                last = output
            assert last is not None and last.error is None
            tokens += last.num_output_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return tokens, time.perf_counter() - started


# --- the server ------------------------------------------------------------------------------------
def write_model() -> None:
    if (MODEL_DIR / "config.json").is_file() and (MODEL_DIR / "vocab.tiktoken").is_file():
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' tokenizer writer
    from engine.config import preset
    from engine.model.random_checkpoint import write_random_checkpoint
    from tests.server.conftest import write_tokenizer

    print(f"writing a tiny random checkpoint to {MODEL_DIR} (one time)...")
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    write_random_checkpoint(MODEL_DIR, preset("tiny"), layout="hf", seed=3)
    write_tokenizer(MODEL_DIR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The app on loopback in a thread, as the tests run it; returns (uvicorn server, app, url)."""
    import uvicorn

    from server.app import create_app
    from server.config import Settings
    from server.services import load_services

    most = max(args.concurrency)
    settings = Settings(
        model=MODEL_DIR,
        served_model_name=MODEL_NAME,
        dtype="float32",
        device="cpu",
        max_num_seqs=most,
        max_num_batched_tokens=max(256, most * args.prompt_len),
        kv_cache_tokens=max(4096, 2 * most * (args.prompt_len + args.output_len + 16)),
        max_waiting_requests=max(256, 4 * most),
        max_model_len=4096,
        port=free_port(),
        log_level="warning",
        engine_process=args.engine == "process",
    )
    app = create_app(settings, load_services)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=settings.port,
        log_level="warning",
        access_log=False,
        http=args.http,
        loop=args.loop,
    )
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, name="uvicorn", daemon=True).start()
    url = f"http://127.0.0.1:{settings.port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, app, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server at {url} did not become healthy")


# --- running ---------------------------------------------------------------------------------------
def run_level(
    args: argparse.Namespace,
    concurrency: int,
    url: str,
    engine: Any,
    pool: ProcessPoolExecutor | None,
) -> dict[str, Result]:
    from engine.sampler import SamplingParams

    n = args.num_requests or max(16, 4 * concurrency)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, min_tokens=args.output_len)
    best: dict[str, Result] = {}
    engine_pid = getattr(engine, "pid", None)
    for round_ in range(args.rounds):
        for mode in args.modes:
            seed = args.seed * 10**6 + concurrency * 1000 + round_ * 10 + (mode == "engine")
            prompts = make_prompts(n, args.prompt_len, seed)
            cpu, client_cpu, engine_cpu = time.process_time(), 0.0, process_cpu_s(engine_pid)
            if mode == "engine":
                tokens, wall = asyncio.run(engine_clients(engine, prompts, params, concurrency))
            elif pool is not None:
                job = (url, prompts, args.output_len, concurrency)
                tokens, wall, client_cpu = pool.submit(http_clients_blocking, *job).result()
            else:
                tokens, wall, _ = http_clients_blocking(url, prompts, args.output_len, concurrency)
            cpu = time.process_time() - cpu
            engine_cpu = process_cpu_s(engine_pid) - engine_cpu
            if tokens != n * args.output_len:
                log.warning("%s: %d tokens, expected %d", mode, tokens, n * args.output_len)
            result = Result(mode, concurrency, n, tokens, wall, cpu, client_cpu, engine_cpu)
            log.info(
                "clients %d round %d %s: %.1f tok/s, server CPU %.0f us/token, engine process "
                "%.0f us/token; cores busy: server %.2f, engine process %.2f, clients %.2f",
                concurrency,
                round_,
                mode,
                result.tokens_per_s,
                result.cpu_us_per_token,
                result.engine_cpu_us_per_token,
                cpu / wall,
                engine_cpu / wall,
                client_cpu / wall,
            )
            if mode not in best or result.tokens_per_s > best[mode].tokens_per_s:
                best[mode] = result
    return best


def print_table(rows: list[dict[str, Result]], engine_kind: str) -> None:
    def cells(result: Result | None) -> tuple[str, str, str, str]:
        if result is None:
            return "-", "-", "-", "-"
        r = result
        return (
            f"{r.requests_per_s:.2f}",
            f"{r.tokens_per_s:.0f}",
            f"{r.cpu_us_per_token:.0f}",
            f"{r.engine_cpu_us_per_token:.0f}",
        )

    in_child = engine_kind == "process"
    print(
        "| engine | clients | requests | req/s HTTP | req/s engine | output tok/s HTTP "
        "| output tok/s engine-direct | HTTP / engine | server CPU us/token HTTP / engine "
        + ("| engine process CPU us/token HTTP / engine |" if in_child else "|")
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if in_child else ""))
    for row in rows:
        http, direct = row.get("http"), row.get("engine")
        some = http or direct
        assert some is not None
        (h_req, h_tok, h_cpu, h_eng), (e_req, e_tok, e_cpu, e_eng) = cells(http), cells(direct)
        ratio = f"{http.tokens_per_s / direct.tokens_per_s:.0%}" if http and direct else "-"
        print(
            f"| {engine_kind} | {some.concurrency} | {some.requests} | {h_req} | {e_req} "
            f"| {h_tok} | {e_tok} | {ratio} | {h_cpu} / {e_cpu} |"
            + (f" {h_eng} / {e_eng} |" if in_child else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--num-requests", type=int, help="per level (default max(16, 4 x clients))")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--engine",
        choices=("process", "thread"),
        default="process",
        help="where the engine core runs, for both modes (default: its own process)",
    )
    parser.add_argument("--clients", choices=("subprocess", "in-process"), default="subprocess")
    parser.add_argument("--http", choices=("auto", "h11", "httptools"), default="auto")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny: 1 is best)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--modes", nargs="+", choices=("http", "engine"), default=["http", "engine"]
    )
    parser.add_argument("--switch-interval", type=float, help="sys.setswitchinterval, seconds")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in ("server", "httpx"):  # no log line per request
        logging.getLogger(name).setLevel(logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    write_model()
    pool = None
    if args.clients == "subprocess":  # started before the server: no threads to fork
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        pool.submit(time.sleep, 0).result()
    server, app, url = start_server(args)
    engine = app.state.server.services.engine
    try:
        warm = max(4, min(args.concurrency))
        warm_prompts = make_prompts(warm, args.prompt_len, args.seed + 1)
        http_clients_blocking(url, warm_prompts, 4, 2)
        from engine.sampler import SamplingParams

        asyncio.run(engine_clients(engine, warm_prompts, SamplingParams(max_tokens=4), 2))
        rows = [run_level(args, c, url, engine, pool) for c in args.concurrency]
    finally:
        server.should_exit = True
        engine.shutdown()  # now, not at interpreter exit (where the child would just vanish)
        if pool is not None:
            pool.shutdown()
    import uvicorn

    print(
        f"\nserver load, tiny random model ({MODEL_DIR}), engine in a {args.engine}, "
        f"float32 CPU, torch threads "
        f"{args.threads}, prompt {args.prompt_len}, output {args.output_len}, greedy, "
        f"clients {args.clients}, uvicorn {uvicorn.__version__} http={args.http} "
        f"loop={args.loop}, best of {args.rounds} rounds, {multiprocessing.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, {datetime.date.today()}\n"
    )
    print_table(rows, args.engine)
    at_32 = next((r for r in rows if len(r) == 2 and r["http"].concurrency == 32), None)
    if at_32 is not None:
        ratio = at_32["http"].tokens_per_s / at_32["engine"].tokens_per_s
        print(f"\nHTTP at 32 clients: {ratio:.0%} of engine-direct (goal >= 90%)")


if __name__ == "__main__":
    main()
