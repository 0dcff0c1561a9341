"""Server settings: one dataclass that is both the source of the server's own CLI flags and what
``create_app`` reads.  Model flags (--model, --ctx, --dtype, --threads, offload flags...) are the ones every
model-loading command shares (:mod:`kimi_local.cli_common`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Optional


API_KEY_ENV = "KIMI_LOCAL_API_KEY"  # keeps the key out of `ps` output


def _flag(default, help: str, **argparse_kw):
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass
class ServerSettings:
    host: str = _flag("127.0.0.1", "address to bind; use 0.0.0.0 to expose the server on the network")
    port: int = _flag(8000, "port to listen on")
    api_key: Optional[str] = _flag(None, "require this key: 'Authorization: Bearer KEY' (all routes) or "
                                         "'x-api-key: KEY' (Anthropic routes); default: $KIMI_LOCAL_API_KEY")
    alias: Optional[str] = _flag(None, "model id reported by /v1/models and in responses")
    max_queue: int = _flag(8, "requests allowed to wait while one generates; more get 429")
    max_body_mb: float = _flag(16.0, "largest request body accepted, in MiB; larger gets 413")
    log_level: str = _flag("info", "uvicorn log level", choices=["critical", "error", "warning", "info", "debug"])

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        for f in dataclasses.fields(cls):
            kw = dict(f.metadata)
            flag = "--" + f.name.replace("_", "-")
            base = f.type.replace("Optional[", "").rstrip("]") if isinstance(f.type, str) else f.type
            typ = {"int": int, "float": float, "str": str}.get(base, str)
            kw["help"] = kw["help"] + (f" (default: {f.default})" if f.default is not None
                                       and "default:" not in kw["help"] else "")
            parser.add_argument(flag, dest=f.name, type=typ, default=f.default, **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ServerSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        settings = cls(**{k: v for k, v in vars(args).items() if k in names})
        if settings.api_key is None:
            settings.api_key = os.environ.get(API_KEY_ENV) or None
        return settings

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
