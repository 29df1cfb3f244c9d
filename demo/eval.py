"""Measure the demo model through the real server: `python -m demo.eval [--model DIR]`.

Starts `python -m server serve` on the checkpoint as a subprocess, waits for `/health`, then sends
held-out generated requests (another seed than training; any whose user text occurs in the
training set is skipped) as chat completions with greedy decoding, several at a time:

- arithmetic: the last number of the answer is the right result;
- tools: the model calls the expected function with JSON arguments that validate against the
  tool's schema; then the eval runs the tool on the model's own arguments, sends the assistant
  message and the tool result back, and checks that the final answer states the result;
- refusals: no tool call, and an answer that says it cannot;
- well-formed harmony: every request is also sent to `/v1/completions` as the token ids the
  server renders for it; the raw output (re-tokenized: special tokens by name) must parse in
  strict mode up to its `<|return|>` or `<|call|>`;
- reasoning effort: the mean analysis length (characters) of the arithmetic answers per effort.

Arithmetic is also tallied by kind of problem, and exact tool arguments by tool (a city copied
wrong shows there, while its call still validates and its result is still used).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from demo import CHECKPOINT_DIR
from demo.conversations import TOOLS, Example, generate, generate_example, to_harmony, tool_result
from harmony import HarmonyParseError, Renderer, Role, load_harmony_encoding, parse_messages

log = logging.getLogger("demo.eval")

EVAL_SEED = 1_000_003
KINDS = {"arith": 120, "tool_call": 100, "refusal": 30}
REFUSAL_WORDS = ("can't", "cannot", "sorry", "unfortunately", "no tool")


def held_out(model_dir: Path, seed: int) -> tuple[list[Example], float]:
    """Eval examples by kind, no request identical to a training one (messages, tools, effort,
    date); also the share whose user question alone occurs in training (the small spaces of
    cities and items make that common for tool questions: the model must still copy the right
    values and read the rest of the prompt)."""
    meta = json.loads((model_dir / "training.json").read_text())
    training = generate(meta["examples"], meta["train_data_seed"])
    seen = {_request_key(e) for e in training}
    seen_questions = {_question(e) for e in training}
    rng = random.Random(seed)
    out: list[Example] = []
    for kind, n in KINDS.items():
        picked = 0
        while picked < n:
            example = generate_example(rng, kind)
            if _request_key(example) not in seen:
                out.append(example)
                picked += 1
    overlap = sum(_question(e) in seen_questions for e in out) / len(out)
    return out, overlap


def _request_key(example: Example) -> str:
    return json.dumps(
        [example.messages, example.tools, example.reasoning_effort, example.today.isoformat()]
    )


def _question(example: Example) -> str:
    users = [m["content"] for m in example.messages if m["role"] == "user"]
    return users[-1]


def validates(arguments: Any, schema: dict[str, Any]) -> bool:
    """The JSON Schema subset the demo tools use: an object, required keys, typed properties."""
    if not isinstance(arguments, dict):
        return False
    properties = schema.get("properties", {})
    if any(key not in arguments for key in schema.get("required", ())):
        return False
    for key, value in arguments.items():
        spec = properties.get(key)
        if spec is None:
            return False
        kind = spec.get("type")
        if kind == "string" and not isinstance(value, str):
            return False
        if kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
            return False
        if "enum" in spec and value not in spec["enum"]:
            return False
    return True


class Evaluator:
    def __init__(self, base_url: str, model_dir: Path, max_tokens: int) -> None:
        self.client = httpx.AsyncClient(base_url=base_url, timeout=600)
        self.encoding = load_harmony_encoding(model_dir=model_dir)
        self.renderer = Renderer(self.encoding)
        self.max_tokens = max_tokens
        self.counts: dict[str, list[bool]] = defaultdict(list)
        self.analysis_chars: dict[str, list[int]] = defaultdict(list)
        self.arithmetic_by_problem: dict[str, list[bool]] = defaultdict(list)
        self.arguments_by_tool: dict[str, list[bool]] = defaultdict(list)
        self.failures: list[str] = []

    def record(self, name: str, ok: bool, detail: str = "") -> None:
        self.counts[name].append(ok)
        if not ok and len(self.failures) < 40:
            self.failures.append(f"{name}: {detail}")

    async def chat(self, example: Example, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": "demo", "messages": messages, "temperature": 0,
            "max_tokens": self.max_tokens, "reasoning_effort": example.reasoning_effort,
        }  # fmt: skip
        if example.tools:
            body["tools"] = example.tools
        response = await self.client.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        return response.json()["choices"][0]["message"]

    async def well_formed(self, example: Example) -> None:
        """The raw completion of the prompt the server renders parses in strict mode."""
        prompt = self.renderer.render_for_completion(to_harmony(example))
        # No stop tokens (a raw completion hides the one it stops on): the output must contain one.
        # The longest training completion is ~110 tokens.
        body = {"model": "demo", "prompt": prompt, "temperature": 0, "max_tokens": 150}
        response = await self.client.post("/v1/completions", json=body)
        response.raise_for_status()
        tokens = self.encoding.encode_with_special_tokens(response.json()["choices"][0]["text"])
        stops = self.encoding.assistant_stop_token_ids
        end = next((i for i, t in enumerate(tokens) if t in stops), None)
        if end is None:
            self.record("well-formed harmony", False, f"no stop token: {tokens[:40]}")
            return
        try:
            parse_messages(self.encoding, tokens[: end + 1], Role.ASSISTANT, strict=True)
            self.record("well-formed harmony", True)
        except HarmonyParseError as exc:
            self.record("well-formed harmony", False, f"{exc}")

    async def run(self, example: Example) -> None:
        await self.well_formed(example)
        message = await self.chat(example, example.messages)
        calls = message.get("tool_calls") or []
        content = message.get("content") or ""
        if example.kind == "arith":
            numbers = re.findall(r"-?\d+", content)
            ok = not calls and bool(numbers) and int(numbers[-1]) == example.check["answer"]
            self.record("arithmetic correct", ok, f"{_question(example)!r} -> {content!r}")
            self.arithmetic_by_problem[example.check["problem"]].append(ok)
            reasoning = message.get("reasoning") or message.get("reasoning_content") or ""
            self.analysis_chars[example.reasoning_effort].append(len(reasoning))
        elif example.kind == "refusal":
            ok = not calls and any(w in content.lower() for w in REFUSAL_WORDS)
            self.record("refusal", ok, f"{_question(example)!r} -> {calls or content!r}")
        else:
            await self._tool_flow(example, message, calls)

    async def _tool_flow(
        self, example: Example, message: dict[str, Any], calls: list[dict[str, Any]]
    ) -> None:
        expected = example.check["tool"]
        name = calls[0]["function"]["name"] if calls else None
        try:
            arguments = json.loads(calls[0]["function"]["arguments"]) if calls else None
        except json.JSONDecodeError:
            arguments = None
        valid = name in TOOLS and validates(arguments, TOOLS[name]["parameters"])
        right = name == expected and valid
        self.record("right tool, valid JSON arguments", right, f"{_question(example)!r} -> {calls}")
        exact = arguments == example.check["arguments"]
        self.record("tool arguments exactly right", exact, f"{_question(example)!r} -> {arguments}")
        self.arguments_by_tool[expected].append(exact)
        if not right:
            self.record("tool result used in the answer", False, "no valid call to answer from")
            return
        result = tool_result(name, arguments, random.Random(_question(example)))
        back = {k: v for k, v in message.items() if k in ("role", "content", "tool_calls")}
        back["reasoning"] = message.get("reasoning")
        tool_message = {"role": "tool", "tool_call_id": calls[0]["id"],
                        "content": json.dumps(result, separators=(", ", ": "))}  # fmt: skip
        final = await self.chat(example, [*example.messages, back, tool_message])
        content = final.get("content") or ""
        facts = [
            str(v) for k, v in result.items() if k in ("temperature", "result", "price", "time")
        ]
        if name == "get_weather":
            facts.append(result["condition"])
        ok = not final.get("tool_calls") and all(f in content for f in facts)
        self.record("tool result used in the answer", ok, f"{result} -> {content!r}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, state_dir: str) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--port", str(port),
        "--served-model-name", "demo", "--state-dir", state_dir, "--log-level", "warning",
        "--max-model-len", "2048", "--kv-cache-tokens", "32768",
    ]  # fmt: skip
    log.info("starting %s", " ".join(command))
    # One thread: on a small shared machine OpenMP threads collapse under contention.
    server = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError("the server did not become healthy in 180 s")


async def evaluate(
    base_url: str, model_dir: Path, examples: list[Example], concurrency: int
) -> dict:
    evaluator = Evaluator(base_url, model_dir, max_tokens=200)
    gate = asyncio.Semaphore(concurrency)

    async def one(example: Example) -> None:
        async with gate:
            await evaluator.run(example)

    started = time.perf_counter()
    await asyncio.gather(*(one(e) for e in examples))
    await evaluator.client.aclose()
    for failure in evaluator.failures:
        log.info("failed %s", failure)
    figures: dict[str, Any] = {
        name: {"ok": sum(v), "n": len(v), "rate": round(sum(v) / len(v), 4)}
        for name, v in evaluator.counts.items()
    }
    figures["arithmetic_by_problem"] = _tally(evaluator.arithmetic_by_problem)
    figures["arguments_by_tool"] = _tally(evaluator.arguments_by_tool)
    figures["analysis_chars_by_effort"] = {
        effort: round(statistics.mean(v), 1)
        for effort, v in sorted(evaluator.analysis_chars.items())
    }
    figures["examples"] = len(examples)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    return figures


def _tally(outcomes: dict[str, list[bool]]) -> dict[str, str]:
    """`right/all` per name, names sorted."""
    return {name: f"{sum(v)}/{len(v)}" for name, v in sorted(outcomes.items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.eval", description=__doc__)
    parser.add_argument("--model", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--seed", type=int, default=EVAL_SEED)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    examples, overlap = held_out(args.model, args.seed)
    log.info("%d held-out requests; %.0f%% of their user questions occur in training",
             len(examples), 100 * overlap)  # fmt: skip
    if args.limit:
        random.Random(0).shuffle(examples)
        examples = examples[: args.limit]
    port = _free_port()
    with tempfile.TemporaryDirectory() as state_dir:
        server = start_server(args.model, port, state_dir)
        try:
            figures = asyncio.run(
                evaluate(f"http://127.0.0.1:{port}", args.model, examples, args.concurrency)
            )
        finally:
            server.terminate()
            server.wait(timeout=60)
    for name, value in figures.items():
        log.info("%s: %s", name, value)
    log.info("figures: %s", json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
