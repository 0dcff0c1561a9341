"""Helpers for the server tests (no tests here): a scripted fake engine, an in-process uvicorn server, and a
subprocess server on the built-in tiny model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence, Union

import httpx

from kimi_local.engine import ContextOverflowError, GenerationChunk, Timings, split_at_stop
from kimi_local.sampling import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expert_backend() -> str:
    """numba when its kernels are importable, else the torch reference (slower, always there)."""
    try:
        import kimi_local.offload.host_experts  # noqa: F401
        return "numba"
    except ImportError:
        return "torch"


class FakeEngine:
    """Engine stand-in that "generates" a fixed script: one piece of text per step.

    ``script`` is a list of text pieces (markers such as ``<|tool_call_begin|>`` are pieces of their own, as
    the real engine yields them) or a callable ``prompt_ids -> pieces``.  Honours ``max_tokens``, stop strings
    and ``cancel`` like the real engine; ``delay`` seconds per step; ``fail_at`` raises RuntimeError at that
    step.  Records every call's params in ``calls``.
    """

    def __init__(self, tokenizer, args, script: Union[Sequence[str], Callable] = ("Hello", " world", "."),
                 ctx_len: int = 2048, delay: float = 0.0):
        self.tokenizer, self.args, self.ctx_len = tokenizer, args, ctx_len
        self.script, self.delay = script, delay
        self.fail_at: Optional[int] = None
        self.calls: list[SamplingParams] = []
        self.steps_after_cancel: list[int] = []
        self._lock = threading.Lock()

    def stats(self) -> dict:
        return {"requests": len(self.calls), "expert_cache": {"hits": 3, "misses": 1}}

    def generate(self, prompt_ids, params: SamplingParams, cancel: Optional[threading.Event] = None):
        params.validate(vocab_size=self.args.vocab_size)
        if len(prompt_ids) >= self.ctx_len:
            raise ContextOverflowError(len(prompt_ids), self.ctx_len)
        self.calls.append(params)
        pieces = list(self.script(prompt_ids) if callable(self.script) else self.script)
        return self._run(list(prompt_ids), params, cancel, pieces)

    def _run(self, prompt, params, cancel, pieces) -> Iterator[GenerationChunk]:
        with self._lock:
            t0 = time.perf_counter()
            n = 0
            pending = ""
            limit = params.max_tokens or 10**9

            def final(reason, text="", stop=None):
                t = Timings(prompt_tokens=len(prompt), cached_tokens=0, generated_tokens=n,
                            prefill_seconds=0.001, decode_seconds=time.perf_counter() - t0,
                            prefill_tok_s=len(prompt) / 0.001, decode_tok_s=n / max(1e-9, time.perf_counter() - t0))
                return GenerationChunk(text, [], reason, t, stop)

            for i, piece in enumerate(pieces):
                if cancel is not None and cancel.is_set():
                    self.steps_after_cancel.append(0)
                    yield final("cancelled")
                    return
                if self.fail_at is not None and i == self.fail_at:
                    raise RuntimeError("scripted engine failure")
                if self.delay:
                    time.sleep(self.delay)
                n += 1
                rest, pending, hit = split_at_stop(pending + piece, params.stop)
                if hit is not None:
                    yield final("stop", rest, hit)
                    return
                if n >= limit:
                    yield final("length", rest + pending)
                    return
                yield GenerationChunk(rest, [i], None)
            n += 1  # the end-of-turn token
            yield final("stop", pending, "<|im_end|>")


def tiny_tokenizer_and_args():
    from kimi_local.config import ModelArgs
    from kimi_local.tiny import ensure_tiny
    from kimi_local.tokenizer import KimiTokenizer

    d = ensure_tiny()
    return KimiTokenizer.from_model_dir(d), ModelArgs.from_model_dir(d), d


class ThreadServer:
    """uvicorn serving ``app`` in a thread of this process, on a free port."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


class SubprocessServer:
    """``python -m kimi_local.server.main`` on a free port (the real CLI path), stopped on exit."""

    def __init__(self, *extra_args: str, load_timeout: float = 240):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "kimi_local.server.main", "--port", str(self.port),
                     "--expert-backend", expert_backend(), "--log-level", "warning", *extra_args]
        self.load_timeout = load_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.health_seen: list[int] = []

    def __enter__(self) -> "SubprocessServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self._log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.time() + self.load_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited:\n" + "".join(self._log))
            try:
                r = httpx.get(self.url + "/health", timeout=2)
                self.health_seen.append(r.status_code)
                if r.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("server not healthy in time:\n" + "".join(self._log))

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.append(line)

    @property
    def log(self) -> str:
        return "".join(self._log)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

