"""Flags shared by every command that loads a model, and the one place that turns them into a model."""

from __future__ import annotations

import argparse
import gc
import os
from typing import Callable, Optional

import torch

from kimi_local.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16}


def add_model_args(p: argparse.ArgumentParser, *, ctx: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="DIR", default=None,
                   help="model directory in the Kimi-K2 / DeepSeek-V3 HF format (default: the built-in tiny demo model)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="activation/weight dtype (default bfloat16)")
    g.add_argument("--device", default="cpu", help="torch device for attention, norms, router, shared expert (cpu, cuda, cuda:1)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch and the expert kernels (default: physical cores)")
    g.add_argument("--expert-backend", choices=["numba", "torch"], default="numba",
                   help="routed experts: numba FP8 kernels (default) or the plain torch reference")
    g.add_argument("--expert-precision", choices=["auto", "bf16", "bf16x2"], default="auto",
                   help="activation precision of the numba expert kernels: auto (default) follows --dtype "
                        "(bf16 for bfloat16, bf16x2 for float32); bf16x2 gives float32-like expert results in a "
                        "bf16 model at up to twice the prefill cost")
    if ctx:
        g.add_argument("--ctx", type=int, default=None, help="context length to allocate (default: min(config, 8192))")
    from kimi_local.offload.options import add_offload_args
    add_offload_args(p)


def physical_cores() -> int:
    from kimi_local.cpu_kernels.fp8_moe import physical_cores as cores
    return cores()


def apply_threads(n: Optional[int]) -> int:
    """One thread budget for torch and the Numba kernels (they run one after another, never together)."""
    n = n or physical_cores()
    if n < 1:
        raise UserError(f"--threads must be >= 1, got {n}")
    torch.set_num_threads(n)
    try:
        from kimi_local.cpu_kernels import fp8_moe
        fp8_moe.set_num_threads(n)
    except ImportError:
        pass
    return n


def apply_expert_precision(mode: str) -> None:
    """--expert-precision: 'auto' lets each call follow the activation dtype; bf16 / bf16x2 force one."""
    from kimi_local.cpu_kernels import fp8_moe
    fp8_moe.set_precision(None if mode == "auto" else mode)


def resolve_model_dir(path: Optional[str]) -> str:
    if path is None:
        from kimi_local.tiny import ensure_tiny
        return ensure_tiny()
    if not os.path.isdir(path):
        raise UserError(f"--model {path}: no such directory")
    return path


def dtype_of(args) -> torch.dtype:
    return DTYPES[args.dtype]


def expert_backend_of(args, model_dir: str):
    """The routed-expert backend the flags ask for: a name, or an offload expert store."""
    from kimi_local.offload.options import build_expert_backend
    return build_expert_backend(args, model_dir)


def load_from_args(args, progress: Optional[Callable[[int, int], None]] = None):
    """(model_dir, model, tokenizer) from the shared flags."""
    from kimi_local.checkpoint import load_model
    from kimi_local.tokenizer import KimiTokenizer

    apply_threads(args.threads)
    apply_expert_precision(getattr(args, "expert_precision", "auto"))
    model_dir = resolve_model_dir(args.model)
    tok = KimiTokenizer.from_model_dir(model_dir)
    model = load_model(model_dir, device=args.device, dtype=dtype_of(args),
                       expert_backend=expert_backend_of(args, model_dir), progress=progress)
    # A command loads one model and then runs for as long as it is used.  What is alive now (torch, the model,
    # ~400K objects) moves out of reach of Python's cyclic collector: a full collection re-traversed all of it,
    # a 250 ms stall whenever one came due in the middle of a reply.
    gc.collect()
    gc.freeze()
    return model_dir, model, tok


def engine_from_args(args, progress: Optional[Callable[[int, int], None]] = None):
    from kimi_local.engine import Engine

    model_dir, model, tok = load_from_args(args, progress)
    engine = Engine(model, tok, ctx=getattr(args, "ctx", None))
    engine.model_dir = model_dir
    return engine
