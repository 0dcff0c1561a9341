"""``kimi-local serve``: start the HTTP server at once, load the model in the background.

``/health`` answers 503 with the load progress until the model is ready, so scripts can start the server
and poll it.  Flags are generated from :class:`~kimi_local.server.settings.ServerSettings`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional

from kimi_local.server.settings import ServerSettings

log = logging.getLogger("kimi_local.server")

def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kimi_local.cli_common import add_model_args

    ServerSettings.add_arguments(parser)
    add_model_args(parser)


def load_engine(args: argparse.Namespace, progress: Callable[[int, int], None]):
    """Load the engine from the shared model flags (the built-in tiny demo model when --model is absent)."""
    from kimi_local.cli_common import engine_from_args

    if args.model is None:
        log.info("no --model given: using the built-in tiny demo model (random weights)")
    engine = engine_from_args(args, progress)
    return engine, engine.model_dir


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from kimi_local.server.app import create_app

    from kimi_local.errors import UserError

    settings = ServerSettings.from_args(args)
    if args.model is not None and not os.path.isdir(args.model):
        raise UserError(f"--model {args.model}: not a directory")
    logging.basicConfig(level=getattr(logging, settings.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model",
                    settings.host)
    app = create_app(settings)
    state = app.state.kimi
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level=settings.log_level, timeout_graceful_shutdown=5))

    def load(model_dir, progress):
        try:
            return load_engine(args, progress)
        except BaseException:
            server.should_exit = True  # a server without a model is of no use: stop, and say why below
            raise

    state.load_in_background(args.model, load)
    log.info("serving on http://%s:%d (OpenAI: /v1, Anthropic: /v1/messages); /health shows load progress",
             settings.host, settings.port)
    server.run()
    if state.load_error:
        raise UserError(f"the model failed to load: {state.load_error}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-local serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
