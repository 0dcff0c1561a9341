"""``kimi-local serve``: an OpenAI- and Anthropic-compatible HTTP API over the engine.

- ``settings``: :class:`ServerSettings`, the one source of the CLI flags and defaults;
- ``app``: ``create_app(settings)`` (FastAPI), auth, body limit, ``/health``, ``/metrics``;
- ``openai_routes`` / ``anthropic_routes``: thin adapters from each API's shapes to the engine;
- ``prompting``: prompt building, ``tool_choice``, output parsing shared by both adapters;
- ``runtime``: the engine slot, the bounded queue, generation in a worker thread;
- ``main``: the ``serve`` subcommand (``add_arguments``/``run``).
"""

from kimi_local.server.settings import ServerSettings


def create_app(*args, **kwargs):
    """See :func:`kimi_local.server.app.create_app` (imported lazily: FastAPI is only needed to serve)."""
    from kimi_local.server.app import create_app as _create_app
    return _create_app(*args, **kwargs)


__all__ = ["ServerSettings", "create_app"]
