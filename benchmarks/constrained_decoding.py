"""Per-token cost of grammar masks: decode steps with constrained requests beside the same unconstrained.

For each model and batch size it runs B requests through an `LLMEngine` three times: free, and
with a harmony reply grammar (a free analysis, then a final answer constrained to a JSON Schema: an
array of objects with a string, an enum, a bounded integer and an optional nested object) with the
masks filled inline at the start of each step, then by the worker thread while the forward runs.
It times decode steps once every request has prefilled (median per run, best of --rounds runs per
cell: shared machines are noisy) and, inline, what the masks cost the step's own thread (picking
the rows, llguidance's parallel fill, unpacking the bits, the sampler's masked fill, advancing the
matchers) as a share of the free step. Same prompts, seeds and logit bias in every run; the bias
keeps the analysis short and bans every token with a `]` in it (weakly: a bias never overrides
the mask) so that the array, and with it the constrained run, never ends early.

Models: `tiny` (the tiny random preset, with the demo checkpoint's vocabulary), `demo` (the
bundled demo checkpoint: 4 layers, hidden 192), and `tiny-o200k` (the tiny preset with the
official o200k_harmony vocabulary, 201,088 ids, from ../shared/tiktoken: the real vocabulary's
mask cost beside a step that is very cheap; skipped when the file is absent).

    python benchmarks/constrained_decoding.py [--models tiny demo tiny-o200k] [--batch 1 32]
        [--steps 48] [--rounds 3] [--threads N]

Goal: masks cost under 5% of step time at batch 32.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import platform
import statistics
import time
from pathlib import Path

import torch

from demo import CHECKPOINT_DIR
from engine import sampler
from engine.config import preset
from engine.constraints import GrammarConstraints, MaskJob
from engine.engine import EngineConfig, LLMEngine
from engine.model.gpt_oss import GptOss
from engine.model.random_checkpoint import write_random_checkpoint
from engine.sampler import SamplingParams
from harmony import HarmonyEncoding, load_harmony_encoding
from harmony.grammar import ReplyConstraint, ReplyGrammars
from server.services import grammar_vocabulary

log = logging.getLogger("constrained_decoding")

RANDOM_ROOT = Path("/tmp/gpt-oss-random")
O200K = (
    Path(__file__).resolve().parent.parent.parent / "shared" / "tiktoken" / "o200k_base.tiktoken"
)
ITEM = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "mode": {"enum": ["train", "plane", "boat"]},
        "nights": {"type": "integer", "minimum": 1, "maximum": 30},
        "hotel": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "stars": {"type": "integer"}},
            "required": ["name"],
        },
    },
    "required": ["city", "mode", "nights"],
    "additionalProperties": False,
}
SCHEMA = {"type": "array", "items": ITEM}


@dataclasses.dataclass
class Timing:
    """Seconds the step's own thread spends on the masks, accumulated by the wrappers below."""

    start_s: float = 0.0  # picking the constrained rows, handing them to the worker
    wait_s: float = 0.0  # joining the worker before sampling, unpacking the bits
    apply_s: float = 0.0  # the sampler's one masked fill
    advance_s: float = 0.0  # feeding the sampled tokens to the matchers

    def total(self) -> float:
        return self.start_s + self.wait_s + self.apply_s + self.advance_s


TIMING = Timing()


def _timed(owner: object, name: str, field: str) -> None:
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            setattr(TIMING, field, getattr(TIMING, field) + time.perf_counter() - start)

    setattr(owner, name, timed)


def _instrument() -> None:
    """Time what the masks cost the step's thread (the benchmark's only reach into the engine)."""
    _timed(GrammarConstraints, "start_masks", "start_s")
    _timed(MaskJob, "wait", "wait_s")
    _timed(sampler, "_apply_token_mask", "apply_s")
    _timed(GrammarConstraints, "advance", "advance_s")


def load(name: str) -> tuple[GptOss, HarmonyEncoding] | None:
    demo_encoding = load_harmony_encoding(model_dir=CHECKPOINT_DIR)
    if name == "demo":
        return GptOss.from_checkpoint(CHECKPOINT_DIR, dtype=torch.float32), demo_encoding
    if name == "tiny":
        encoding, vocab = demo_encoding, demo_encoding.n_vocab
    elif name == "tiny-o200k":
        if not O200K.is_file():
            log.warning("skipping tiny-o200k: no %s", O200K)
            return None
        encoding, vocab = load_harmony_encoding(O200K), 201088
    else:
        raise ValueError(f"unknown model {name!r}; expected tiny, demo or tiny-o200k")
    directory = RANDOM_ROOT / f"tiny-vocab-{vocab}"
    if not (directory / "config.json").is_file():
        print(f"writing a tiny random checkpoint with {vocab} ids to {directory} (one time)...")
        config = dataclasses.replace(preset("tiny"), vocab_size=vocab)
        write_random_checkpoint(directory, config, layout="hf", seed=5)
    return GptOss.from_checkpoint(directory, dtype=torch.float32), encoding


def run(
    model: GptOss,
    encoding: HarmonyEncoding,
    batch: int,
    grammar: str | None,
    overlap: bool,
    steps: int,
    engine_cache: dict,
) -> tuple[float, float]:
    """Median decode-step seconds for `batch` requests (free, or all under `grammar`, the masks
    filled by the worker thread or not), and per timed step the seconds the masks took on the
    step's thread."""
    key = (id(model), batch)
    if key not in engine_cache:  # one engine per model and batch: the tokenizer is built once
        config = EngineConfig(max_num_seqs=batch, kv_cache_tokens=batch * 1024, max_model_len=1024)
        engine_cache[key] = LLMEngine(model, config, grammar_vocabulary(encoding))
    engine: LLMEngine = engine_cache[key]
    assert engine.constraints is not None
    engine.constraints.overlap = overlap
    bias = {t: -100.0 for piece, t in encoding.mergeable_ranks.items() if b"]" in piece}
    bias.update({encoding.ids.end: 4.0, encoding.encode('"')[0]: 3.0})
    for i in range(batch):
        text = f"<|start|>user<|message|>Plan trip {i}.<|end|><|start|>assistant"
        params = SamplingParams(
            temperature=1.0, seed=i, max_tokens=steps + 8, logit_bias=bias, grammar=grammar
        )
        engine.add_request(f"r{i}", encoding.encode_with_special_tokens(text), params)
    while any(not r.output_token_ids for r in engine.requests.values()):
        engine.step()  # prefill (and the first decodes of the early ones)
    times = []
    TIMING.__init__()
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    assert len(engine.requests) == batch, "a request ended early: the timing would be off"
    for request_id in list(engine.requests):
        engine.abort(request_id)
    return statistics.median(times), TIMING.total() / steps


def measure(name: str, batches: list[int], steps: int, rounds: int) -> list[dict]:
    loaded = load(name)
    if loaded is None:
        return []
    model, encoding = loaded
    grammar = ReplyGrammars(encoding).build(ReplyConstraint(final_schema=SCHEMA))
    engines: dict = {}
    rows = []
    for batch in batches:
        run(model, encoding, batch, grammar, True, 4, engines)  # warm-up: caches, first masks
        free, inline, worker, masks = [], [], [], []
        for _ in range(rounds):
            free.append(run(model, encoding, batch, None, False, steps, engines)[0])
            step_s, masks_s = run(model, encoding, batch, grammar, False, steps, engines)
            inline.append(step_s)
            masks.append(masks_s)
            worker.append(run(model, encoding, batch, grammar, True, steps, engines)[0])
        rows.append(
            {
                "model": name,
                "vocab": model.config.vocab_size,
                "batch": batch,
                "free_ms": 1e3 * min(free),
                "inline_ms": 1e3 * min(inline),
                "worker_ms": 1e3 * min(worker),
                "masks_us": 1e6 * statistics.median(masks),
            }
        )
        log.info("%s", rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "demo", "tiny-o200k"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--steps", type=int, default=48, help="timed decode steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs per cell")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    _instrument()
    rows = [
        row for name in args.models for row in measure(name, args.batch, args.steps, args.rounds)
    ]
    print(
        f"\n{datetime.date.today()}, {platform.machine()}, {torch.get_num_threads()} torch "
        f"thread(s), CPU, float32, {args.steps} decode steps, best of {args.rounds}\n"
    )
    print(
        "| model | vocab | batch | step, free | constrained, masks inline "
        "| constrained, masks in the worker | masks on the step's thread, inline |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        free = r["free_ms"]
        print(
            f"| {r['model']} | {r['vocab']:,} | {r['batch']} | {free:.2f} ms "
            f"| {r['inline_ms']:.2f} ms ({r['inline_ms'] / free - 1:+.1%}) "
            f"| {r['worker_ms']:.2f} ms ({r['worker_ms'] / free - 1:+.1%}) "
            f"| {r['masks_us']:.0f} us ({r['masks_us'] / (1e3 * free):.1%}) |"
        )


if __name__ == "__main__":
    main()
