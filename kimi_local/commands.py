"""Small subcommands: ``make-tiny``, ``generate`` and ``perplexity``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

from kimi_local.cli_common import add_model_args, engine_from_args, load_from_args
from kimi_local.errors import UserError


# ----------------------------------------------------------------------------------------- make-tiny

def add_arguments_make_tiny(p: argparse.ArgumentParser) -> None:
    from kimi_local.tiny import VARIANTS
    p.add_argument("dir", help="output directory (created; must be empty or absent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="k2-0711",
                   help="config family: K2-Instruct 0711, 0905 (YaRN factor 64) or DeepSeek-V3 (n_group 8, MTP layer)")


def run_make_tiny(args) -> int:
    from kimi_local.tiny import make_tiny
    if os.path.exists(args.dir) and os.listdir(args.dir):
        raise UserError(f"{args.dir}: directory is not empty")
    t0 = time.perf_counter()
    make_tiny(args.dir, seed=args.seed, variant=args.variant)
    print(f"wrote tiny {args.variant} model (seed {args.seed}) to {args.dir} in {time.perf_counter() - t0:.1f}s")
    return 0


# ----------------------------------------------------------------------------------------- generate

def add_arguments_generate(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--prompt", required=True, help="text to continue (plain text, no chat template)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming text")


def run_generate(args) -> int:
    from kimi_local.sampling import SamplingParams

    engine = engine_from_args(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed, max_tokens=args.max_tokens)
    ids = engine.tokenizer.encode(args.prompt)
    text, token_ids, timings, finish = [], [], None, None
    for chunk in engine.generate(ids, params):
        text.append(chunk.text)
        token_ids.extend(chunk.token_ids)
        if not args.json and chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        if chunk.finish_reason:
            timings, finish = chunk.timings, chunk.finish_reason
    if args.json:
        print(json.dumps({"text": "".join(text), "token_ids": token_ids, "finish_reason": finish,
                          "timings": timings.to_dict() if timings else {}}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        if timings:
            print(f"[{timings.prompt_tokens} prompt tokens, {timings.generated_tokens} generated; "
                  f"prefill {timings.prefill_tok_s:.1f} tok/s, decode {timings.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------- perplexity

def add_arguments_perplexity(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--file", required=True, help="UTF-8 text file to score")
    p.add_argument("--chunk", type=int, default=512, help="tokens per forward pass inside a window")
    p.add_argument("--json", action="store_true", help='print {"tokens", "nll", "perplexity"} as one JSON object')


def window_plan(n: int, ctx: int) -> list[tuple[int, int, int]]:
    """Windows (start, end, first_scored) covering tokens 0..n-1.

    A text that fits the context is one window and every position 1..n-1 is scored given its full prefix.
    A longer text is scored in windows of ``ctx`` tokens advancing by ``ctx // 2``: each window scores
    only the tokens the previous windows did not, so every token after the first is scored exactly once,
    with at least ``ctx // 2`` tokens of context (except inside the first window).
    """
    if n <= ctx:
        return [(0, n, 1)]
    stride = max(1, ctx // 2)
    plan, scored_to, start = [], 1, 0
    while scored_to < n:
        end = min(start + ctx, n)
        plan.append((start, end, scored_to))
        scored_to = end
        start = min(start + stride, n - ctx) if end < n else end
    return plan


def score_tokens(model, ids: list[int], ctx: int, chunk: int = 512) -> tuple[float, int]:
    """(sum of NLL in nats, number of scored tokens) under :func:`window_plan`."""
    cache = model.new_cache(min(ctx, len(ids)))
    total, count = 0.0, 0
    for start, end, first in window_plan(len(ids), ctx):
        window = torch.tensor([ids[start:end]], device=model.lm_head.weight.device)
        for c0 in range(0, end - start, chunk):
            c1 = min(c0 + chunk, end - start)
            logits = model(window[:, c0:c1], c0, cache)[0]          # predicts tokens c0+1 .. c1
            lo = max(c0, first - start - 1)                          # first position whose *next* token is scored
            hi = min(c1, end - start - 1)
            if lo >= hi:
                continue
            logp = torch.log_softmax(logits[lo - c0: hi - c0].float(), dim=-1)
            target = window[0, lo + 1: hi + 1]
            total -= logp.gather(1, target[:, None]).sum().item()
            count += hi - lo
    return total, count


def run_perplexity(args) -> int:
    try:
        with open(args.file, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"--file {args.file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--file {args.file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    _, model, tok = load_from_args(args)
    ids = tok.encode(text)
    if len(ids) < 2:
        raise UserError(f"--file {args.file}: needs at least 2 tokens, has {len(ids)}")
    ctx = args.ctx or min(model.args.max_position_embeddings, 4096)
    if ctx < 2:
        raise UserError(f"--ctx must be >= 2, got {ctx}")
    t0 = time.perf_counter()
    nll_sum, n = score_tokens(model, ids, ctx, args.chunk)
    nll = nll_sum / n
    out = {"tokens": len(ids), "nll": nll, "perplexity": math.exp(nll)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"tokens: {len(ids)}  scored: {n}  nll: {nll:.4f}  perplexity: {math.exp(nll):.3f}  "
              f"({n / (time.perf_counter() - t0):.1f} tok/s)")
    return 0
