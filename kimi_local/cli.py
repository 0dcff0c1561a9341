"""The ``kimi-local`` command: one entry point, one module per subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are imported
only when their subcommand runs, so ``kimi-local --help`` stays instant and light.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "chat": ("kimi_local.chat", "terminal chat (built-in tiny demo model unless --model is given)"),
    "serve": ("kimi_local.server.main", "OpenAI- and Anthropic-compatible local API server"),
    "generate": ("kimi_local.commands", "plain text continuation of a prompt"),
    "perplexity": ("kimi_local.commands", "perplexity of a text file"),
    "make-tiny": ("kimi_local.commands", "write a tiny random model in the exact Kimi-K2 on-disk format"),
    "bench": ("kimi_local.bench", "benchmarks (end-to-end, kernels, k2-layer, load, offload), JSON output"),
    "plan": ("kimi_local.offload.plan_cli", "GPU/RAM/disk placement plan for a model (config.json is enough)"),
    "doctor": ("kimi_local.offload.doctor", "check this machine for running Kimi-K2 and say what will hurt"),
    "cachesim": ("kimi_local.offload.cachesim", "replay a routing trace through expert-cache policies"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kimi-local", description="Run Kimi-K2 locally.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        mod = importlib.import_module(module) if name in _wanted else None
        if mod is not None:
            adder = getattr(mod, f"add_arguments_{name.replace('-', '_')}", None) or mod.add_arguments
            adder(p)
    return parser


_wanted: set[str] = set()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Import only the module of the subcommand actually asked for.
    _wanted.clear()
    for a in argv:
        if a in SUBCOMMANDS:
            _wanted.add(a)
            break
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    runner = getattr(mod, f"run_{args.command.replace('-', '_')}", None) or mod.run
    try:
        return int(runner(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line error, never a traceback, for expected failures
        from kimi_local.errors import UserError
        if isinstance(e, UserError):
            print(f"kimi-local {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
