"""The generation engine: one session, one preallocated MLA latent KV cache, a generator of chunks.

``Engine.generate(prompt_ids, params)`` checks its inputs at call time (a prompt that does not fit
raises ``ContextOverflowError`` before any work), then returns a generator.  Iterating it

1. reuses the longest prefix the prompt shares with the tokens already in the cache (the next turn
   of a chat, an editor resending a long file) and prefills only the rest, ``prefill_chunk`` tokens
   per forward pass;
2. decodes one token per step, yielding one ``GenerationChunk`` per sampled token, until a stop
   token, a user stop string, ``max_tokens``, the end of the context, or ``cancel`` is set; the final
   chunk carries ``finish_reason`` and ``Timings``.

Stop tokens (default ``<|im_end|>`` and ``[EOS]``) never appear in ``text`` or ``token_ids``.  Text
that could still turn into a user stop string is held back until it either completes the stop
string (then it is dropped and generation ends) or cannot any more (then it is shown).  Other
special tokens, the tool-call markers included, come through in ``text`` as their strings.

One generation at a time: a lock is taken when the generator starts and released when it finishes,
is closed, or is garbage-collected; a second ``generate`` from another thread waits for it.  A
consumer that stops early must ``close()`` the generator (or drop it) before starting another on the
same thread.  The record of cached tokens is updated after every forward pass, so an early close, a
cancel, or an exception mid-forward leaves the engine consistent: the next prompt reuses exactly
the positions that were written.

Context: ``ctx_len`` is ``ctx`` (``--ctx``) when given, at most the config's
``max_position_embeddings``; otherwise ``min(max_position_embeddings, DEFAULT_CTX_CAP)`` with the cap
at 8192 to keep the cache small (K2's latent cache costs 61 layers x 576 values x 2 bytes = 70 KB per
token: 576 MB at 8192, 9.2 GB at the full 131072).  A generation that reaches the
end of the context finishes with ``"length"``; there is no silent truncation of the prompt.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Iterator, Optional

import torch

from kimi_local.errors import UserError
from kimi_local.sampling import SamplingParams, make_sampler
from kimi_local.tokenizer import KimiTokenizer, StreamDecoder

DEFAULT_CTX_CAP = 8192


class ContextOverflowError(UserError, ValueError):
    """The prompt does not fit in the context window (nothing was computed)."""

    def __init__(self, prompt_tokens: int, ctx_len: int):
        super().__init__(
            f"prompt has {prompt_tokens} tokens but the context window is {ctx_len} tokens "
            f"(at least one must be left to generate); shorten the conversation or raise --ctx")
        self.prompt_tokens = prompt_tokens
        self.ctx_len = ctx_len


@dataclass
class Timings:
    prompt_tokens: int       # tokens in the prompt
    cached_tokens: int       # of which reused from the KV cache (not recomputed)
    generated_tokens: int    # tokens sampled, a final stop token included
    prefill_seconds: float   # engine time in prefill forward passes
    decode_seconds: float    # engine time after prefill: sampling and one forward per token but the last
    prefill_tok_s: float     # (prompt_tokens - cached_tokens) / prefill_seconds
    decode_tok_s: float      # generated_tokens / decode_seconds

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationChunk:
    text: str                          # newly visible text since the previous chunk ("" allowed)
    token_ids: list                    # tokens accepted in this step (never a stop token)
    finish_reason: Optional[str]       # None while running; final chunk: "stop" | "length" | "cancelled"
    timings: Optional[Timings] = None  # set on the final chunk
    stop_reason: Optional[str] = None  # the stop string, or the stop token's text, that ended it


def split_at_stop(text: str, stops: list) -> tuple[str, str, Optional[str]]:
    """Split pending ``text`` into (visible, held back, matched stop string).

    If a stop string occurs, visible is the text before its earliest occurrence and the rest is
    discarded.  Otherwise the held-back part is the longest suffix that is a proper prefix of some
    stop string (it could still complete one); everything before it is safe to show, because no
    earlier position can start a match.
    """
    if not stops:
        return text, "", None
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    if best is not None:
        return text[:best[0]], "", best[1]
    longest = max(len(s) for s in stops)
    for i in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[i:]
        if any(s.startswith(tail) for s in stops):
            return text[:i], tail, None
    return text, "", None


class Engine:
    """A single-session generation engine over a ``KimiModel`` and a ``KimiTokenizer``.

    Args:
        model: the loaded model (``forward(tokens, start_pos, cache, last_only)``, ``new_cache``).
        tokenizer: provides ``eos_ids``, ``decode`` and ``StreamDecoder`` support.
        ctx: cap on the context window; default ``min(max_position_embeddings, DEFAULT_CTX_CAP)``.
            A value above ``max_position_embeddings`` is an error.
        prefill_chunk: prompt tokens per prefill forward pass (bounds activation memory).
    """

    def __init__(self, model, tokenizer, *, ctx: Optional[int] = None, prefill_chunk: int = 512):
        self.model = model
        self.tokenizer = tokenizer
        self.args = model.args
        limit = self.args.max_position_embeddings
        if ctx is None:
            ctx = min(limit, DEFAULT_CTX_CAP)
        elif isinstance(ctx, bool) or not isinstance(ctx, int) or ctx < 2:
            raise UserError(f"--ctx must be an integer >= 2, got {ctx!r}")
        elif ctx > limit:
            raise UserError(f"--ctx {ctx} exceeds the model's max_position_embeddings ({limit})")
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1:
            raise UserError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}")
        self.ctx_len = ctx
        self.prefill_chunk = prefill_chunk
        self.cache = model.new_cache(ctx, batch=1)
        self._device = next(model.parameters()).device
        # Sample only ids the tokenizer can decode (a padded lm_head may be wider than the vocabulary).
        self._n_vocab = min(self.args.vocab_size, getattr(tokenizer, "vocab_size", self.args.vocab_size))
        self._cached: list = []             # tokens whose latents occupy cache positions 0..len-1
        self._lock = threading.Lock()       # one generation at a time (see module docstring)
        self._totals = {"requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0,
                        "prefill_seconds": 0.0, "decode_seconds": 0.0}
        self._last: Optional[Timings] = None

    @classmethod
    def from_model_dir(cls, model_dir: str, *, ctx: Optional[int] = None, dtype=torch.bfloat16, device="cpu",
                       expert_backend="numba", progress=None, prefill_chunk: int = 512) -> "Engine":
        """Load model and tokenizer from a Kimi-K2 directory (``progress(done_bytes, total_bytes)``)."""
        from kimi_local.checkpoint import load_model  # the engine itself works on any model object

        tokenizer = KimiTokenizer.from_model_dir(model_dir)
        model = load_model(model_dir, device=device, dtype=dtype, expert_backend=expert_backend, progress=progress)
        return cls(model, tokenizer, ctx=ctx, prefill_chunk=prefill_chunk)

    # ------------------------------------------------------------------ public API

    @property
    def cached_tokens(self) -> list:
        """A copy of the token ids whose KV currently sits in the cache."""
        return list(self._cached)

    def reset(self) -> None:
        """Forget the cached prefix (the next prompt is prefilled from scratch)."""
        with self._lock:
            self._cached = []

    def stats(self) -> dict:
        """Cumulative counters since the engine was made, the cache fill, and the last generation's timings."""
        t = dict(self._totals)
        out = {**t, "ctx_len": self.ctx_len, "cache_fill": len(self._cached),
               "cache_bytes": getattr(self.cache, "nbytes", None),
               "last": self._last.to_dict() if self._last is not None else None}
        expert_stats = getattr(self.model.experts, "stats", None)
        if expert_stats is not None:  # the offload runtime: hit rates per tier, bytes moved, prediction
            out["experts"] = expert_stats()
        return out

    def generate(self, prompt_ids: list, params: SamplingParams,
                 cancel: Optional[threading.Event] = None) -> Iterator[GenerationChunk]:
        """Validate now, then return a generator of ``GenerationChunk``s (see the module docstring).

        Raises (before any work): ``SamplingError`` for bad params, ``ContextOverflowError`` when
        ``len(prompt_ids) >= ctx_len``, ``UserError`` for an empty prompt or out-of-vocabulary ids.
        """
        prompt = [int(t) for t in prompt_ids]
        vocab = self.args.vocab_size
        params.validate(vocab_size=vocab)
        if not prompt:
            raise UserError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= vocab:
            bad = next(t for t in prompt if not 0 <= t < vocab)
            raise UserError(f"prompt token id {bad} is outside the vocabulary (0..{vocab - 1})")
        if len(prompt) >= self.ctx_len:
            raise ContextOverflowError(len(prompt), self.ctx_len)
        return self._generate(prompt, params, cancel)

    # ------------------------------------------------------------------ internals

    def _forward(self, tokens: list, start_pos: int) -> torch.Tensor:
        """Run ``tokens`` at ``start_pos``; return the last position's logits [V] (float32)."""
        # Only positions < start_pos are trusted until this pass completes: if it raises (or the
        # consumer is interrupted inside it) the record already excludes what it may have half-written.
        del self._cached[start_pos:]
        x = torch.tensor([tokens], dtype=torch.long, device=self._device)
        logits = self.model.forward(x, start_pos=start_pos, cache=self.cache, last_only=True)
        self._cached.extend(tokens)
        return logits[0, -1, :self._n_vocab]

    def _generate(self, prompt: list, params: SamplingParams,
                  cancel: Optional[threading.Event]) -> Iterator[GenerationChunk]:
        with self._lock:  # held across yields; released when the generator finishes or is closed
            yield from self._run(prompt, params, cancel, StreamDecoder(self.tokenizer))

    def _run(self, prompt: list, params: SamplingParams, cancel: Optional[threading.Event],
             decoder) -> Iterator[GenerationChunk]:
        stop_ids = set(params.stop_token_ids if params.stop_token_ids is not None else self.tokenizer.eos_ids)
        stops = list(params.stop)
        n_prompt = len(prompt)
        max_new = self.ctx_len - n_prompt  # the whole sequence must fit in the cache
        if params.max_tokens is not None:
            max_new = min(max_new, params.max_tokens)

        def cancelled() -> bool:
            return cancel is not None and cancel.is_set()

        # Prefix reuse: keep the shared prefix, but always recompute the last prompt token for its logits.
        shared = 0
        for a, b in zip(self._cached, prompt):
            if a != b:
                break
            shared += 1
        cached = min(shared, n_prompt - 1)
        del self._cached[cached:]
        self._totals["requests"] += 1
        self._totals["prompt_tokens"] += n_prompt
        self._totals["cached_tokens"] += cached

        generated: list = []   # sampled tokens (a final stop token included)
        pending = ""           # decoded text held back because it could start a stop string
        prefill_s = decode_s = 0.0

        def final(reason: str, text: str = "", ids: Optional[list] = None, stop_reason: Optional[str] = None,
                  flush: bool = True) -> GenerationChunk:
            if flush:  # show the held-back text (and the decoder's last bytes) unless they complete a stop string
                rest, held, hit = split_at_stop(pending + decoder.flush(), stops)
                text += rest + held  # nothing more is coming: a partial stop string is just text
                if hit is not None:
                    reason, stop_reason = "stop", hit
            n_gen = len(generated)
            timings = Timings(
                prompt_tokens=n_prompt, cached_tokens=cached, generated_tokens=n_gen,
                prefill_seconds=prefill_s, decode_seconds=decode_s,
                prefill_tok_s=(n_prompt - cached) / prefill_s if prefill_s > 0 else 0.0,
                decode_tok_s=n_gen / decode_s if decode_s > 0 else 0.0)
            self._last = timings
            self._totals["generated_tokens"] += n_gen
            self._totals["prefill_seconds"] += prefill_s
            self._totals["decode_seconds"] += decode_s
            return GenerationChunk(text, ids or [], reason, timings, stop_reason)

        # ---- prefill, prefill_chunk tokens per pass
        pos = cached
        logits = None
        while pos < n_prompt:
            if cancelled():
                yield final("cancelled")
                return
            t0 = time.perf_counter()
            chunk = prompt[pos:pos + self.prefill_chunk]
            logits = self._forward(chunk, pos)
            pos += len(chunk)
            prefill_s += time.perf_counter() - t0

        # ---- decode: each step forwards the previous token (if any), samples, and yields one chunk.
        # The chunk is yielded before the next forward so text reaches the consumer without waiting.
        sample = make_sampler(params)
        token = None
        while True:
            if cancelled():
                yield final("cancelled")
                return
            t0 = time.perf_counter()
            if token is not None:
                logits = self._forward([token], n_prompt + len(generated) - 1)
            token = sample(logits, generated)
            generated.append(token)
            if token in stop_ids:
                decode_s += time.perf_counter() - t0
                yield final("stop", stop_reason=self.tokenizer.decode([token]))
                return
            rest, pending, hit = split_at_stop(pending + decoder.push(token), stops)
            decode_s += time.perf_counter() - t0
            if hit is not None:
                yield final("stop", rest, [token], stop_reason=hit, flush=False)
                return
            if len(generated) >= max_new:
                yield final("length", rest, [token])
                return
            yield GenerationChunk(rest, [token], None)
