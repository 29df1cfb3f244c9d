"""One command from nothing to the bundled demo checkpoint: `python -m demo.train --out DIR`.

Steps, all seeded: generate the synthetic conversations (`demo.conversations`), train the BPE
vocabulary on exactly the texts the server's renderer encodes (`demo.bpe`), render every example
to (prompt, completion) tokens with the server's own code, batch them by length, train the toy
gpt-oss (`demo.training_model`) with the loss on completion tokens only, finish with a
quantization-aware phase (experts rounded through MXFP4), and write the checkpoint (original
layout, MXFP4 experts) with its tokenizer files and a `training.json` of what was done.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from demo import CHECKPOINT_DIR
from demo.bpe import RecordingEncoding, build_encoding, train_bpe, write_vocabulary
from demo.conversations import generate, render_example
from demo.training_model import TrainingGptOss, write_original_checkpoint
from engine.config import ModelConfig
from harmony import Renderer

log = logging.getLogger("demo.train")

TRAIN_SEED = 0
BPE_EXAMPLES = 4000
BPE_MAX_RANKS = 4000


def demo_config(vocab_size: int, hidden: int = 192, layers: int = 4) -> ModelConfig:
    """gpt-oss at toy size: the real head dim, GQA, sinks, sliding window 128 and YaRN."""
    return ModelConfig(
        num_layers=layers, num_experts=8, experts_per_token=2, vocab_size=vocab_size,
        hidden_size=hidden, intermediate_size=hidden, head_dim=64,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 128),
        sliding_window=128, layer_types=tuple(
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ),
    )  # fmt: skip


def make_batches(
    pairs: list[tuple[list[int], list[int]]], batch_tokens: int, rng: random.Random
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of conversations of similar length (little padding, attention cost ~ length^2).

    Returns (input ids [B, T], targets [B, T]): the target of position j is token j + 1 where that
    is a completion token, else -100 (no loss on the prompt or the padding).
    """
    order = sorted(range(len(pairs)), key=lambda k: (len(pairs[k][0]) + len(pairs[k][1]), k))
    batches = []
    start = 0
    while start < len(order):
        longest = len(pairs[order[start]][0]) + len(pairs[order[start]][1])
        end = start
        while end < len(order):
            length = len(pairs[order[end]][0]) + len(pairs[order[end]][1])
            if (end - start + 1) * length > batch_tokens:
                break
            longest = length
            end += 1
        end = max(end, start + 1)
        rows = [pairs[k] for k in order[start:end]]
        ids = torch.zeros((len(rows), longest), dtype=torch.long)
        targets = torch.full((len(rows), longest), -100, dtype=torch.long)
        for r, (prompt, completion) in enumerate(rows):
            tokens = prompt + completion
            ids[r, : len(tokens)] = torch.tensor(tokens)
            targets[r, len(prompt) - 1 : len(tokens) - 1] = torch.tensor(completion)
        batches.append((ids, targets))
        start = end
    rng.shuffle(batches)
    return batches


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` to a tenth of it."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    examples = generate(args.examples, TRAIN_SEED + args.seed)
    recording = RecordingEncoding()
    recorder = Renderer(recording)
    recorder._piece = recorder._encode_piece  # count repeated header pieces, not only the first
    for example in examples[:BPE_EXAMPLES]:
        render_example(example, recorder)
    tokens = train_bpe(recording.texts.elements(), BPE_MAX_RANKS)
    encoding = build_encoding(tokens)
    renderer = Renderer(encoding)
    pairs = [render_example(example, renderer) for example in examples]
    n_tokens = sum(len(p) + len(c) for p, c in pairs)
    log.info(
        "%d examples, %d tokens (%.0f per example), vocabulary %d, data ready in %.1fs",
        len(pairs), n_tokens, n_tokens / len(pairs), encoding.n_vocab,
        time.perf_counter() - started,
    )  # fmt: skip
    config = demo_config(encoding.n_vocab, args.hidden, args.layers)
    model = TrainingGptOss(config, seed=args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %s, %.2f M parameters", config, n_params / 1e6)
    rng = random.Random(args.seed)
    batches = make_batches(pairs, args.batch_tokens, rng)
    log.info("%d batches of up to %d tokens", len(batches), args.batch_tokens)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )  # fmt: skip
    loss_avg = None
    t_train = time.perf_counter()
    budget_s = args.time_budget_min * 60
    step = 0
    progress = 0.0
    # Progress is the larger of steps done and time spent: on a machine that keeps up the run is
    # the same step for step; on a slower (or shared) one it ends in time, still annealed.
    while progress < 1.0:
        ids, targets = batches[step % len(batches)]
        if step % len(batches) == len(batches) - 1:
            rng.shuffle(batches)
        positions = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
        # Padding sits after each conversation, so causality alone keeps it out of sight.
        docs = torch.zeros_like(ids)
        model.quantize_experts = progress >= 1 - args.qat_fraction
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, progress, args.lr, args.warmup)
        hidden = model(ids, positions, docs)
        keep = targets != -100
        # The unembedding only where there is a target: most tokens are prompt.
        loss = F.cross_entropy(model.logits(hidden[keep]), targets[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        step += 1
        progress = max(step / args.steps, (time.perf_counter() - t_train) / budget_s)
        if step % args.log_every == 0 or progress >= 1.0:
            elapsed = time.perf_counter() - t_train
            log.info(
                "step %d/%d loss %.4f (avg %.4f) lr %.2e %s%.1f steps/s, %.0fs",
                step, args.steps, loss.item(), loss_avg, optimizer.param_groups[0]["lr"],
                "QAT " if model.quantize_experts else "", step / elapsed, elapsed,
            )  # fmt: skip
    train_s = time.perf_counter() - t_train
    out = Path(args.out)
    model.quantize_experts = False
    write_original_checkpoint(model, out)
    write_vocabulary(out, tokens)
    summary = {
        "command": "python -m demo.train " + " ".join(sys.argv[1:]),
        "seed": args.seed,
        "train_data_seed": TRAIN_SEED + args.seed,
        "examples": args.examples,
        "tokens": n_tokens,
        "parameters": n_params,
        "steps": step,
        "planned_steps": args.steps,
        "threads": args.threads,
        "batch_tokens": args.batch_tokens,
        "final_loss_avg": round(loss_avg or 0.0, 4),
        "train_seconds": round(train_s, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("wrote %s: %s", out, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.train", description=__doc__)
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--examples", type=int, default=30000)
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument(
        "--time-budget-min",
        type=float,
        default=24.0,
        help="end (annealed) after this long even if the steps are not all done",
    )
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per step, padded")
    parser.add_argument("--hidden", type=int, default=192)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--qat-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads (on a 2-core machine shared with other work, 1 is faster)",
    )
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
