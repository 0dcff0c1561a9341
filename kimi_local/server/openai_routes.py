"""OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

A thin adapter: request fields -> prompt ids and ``SamplingParams``; engine chunks -> OpenAI objects or SSE
chunks.  Every response carries llama.cpp-style ``timings``; ``usage`` carries
``prompt_tokens_details.cached_tokens``.  Streams send one ``id``, ``role`` in the first delta, content and
``tool_calls`` deltas, a final chunk with ``finish_reason``, then ``data: [DONE]``.  Without
``stream_options.include_usage`` the final chunk carries ``usage`` anyway (many clients need the counts and
do not ask); with it, ``usage`` comes in an extra chunk with ``choices: []`` as OpenAI specifies.

Defaults: ``temperature`` 0.6 (Moonshot's recommendation for K2-Instruct) when the request has none; no
``max_tokens`` means "until the context is full" on chat (OpenAI's semantics) and 16 on legacy completions.

Not supported and ignored (as unknown fields are): ``logprobs``, ``response_format`` (no constrained
decoding), ``parallel_tool_calls``, ``user``, ``suffix``.  ``n`` other than 1 is refused with a 400.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from kimi_local import chat_format as cf
from kimi_local.sampling import SamplingParams
from kimi_local.server.errors import APIError, ErrorHandlingRoute, error_body
from kimi_local.server.prompting import (OutputReader, PreparedPrompt, ToolChoice, parse_full, prepare_chat,
                                         start_engine, stop_list, timings_dict)
from kimi_local.server.runtime import Generation, ServerState
from kimi_local.server.schemas import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("kimi_local.server")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def get_state(request: Request) -> ServerState:
    return request.app.state.kimi


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ----------------------------------------------------------------------------------------- shared pieces

def sampling_params(body: Any, max_tokens: Optional[int]) -> SamplingParams:
    if body.n not in (None, 1):
        raise APIError(400, f"n: only n=1 is supported (one completion per request), got {body.n}", param="n")
    kw = {name: getattr(body, name) for name in
          ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
           "repetition_penalty", "seed") if getattr(body, name) is not None}
    if body.logit_bias:
        try:
            kw["logit_bias"] = {int(k): float(v) for k, v in body.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias: keys must be token ids (integers as strings)", param="logit_bias")
    return SamplingParams(**kw, max_tokens=max_tokens, stop=stop_list(body.stop))


def usage_dict(t: Any) -> dict:
    if t is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0,
                "prompt_tokens_details": {"cached_tokens": 0}}
    return {"prompt_tokens": t.prompt_tokens, "completion_tokens": t.generated_tokens,
            "total_tokens": t.prompt_tokens + t.generated_tokens,
            "prompt_tokens_details": {"cached_tokens": t.cached_tokens}}


def finish_reason(engine_reason: Optional[str], has_tool_calls: bool) -> str:
    if engine_reason == "length":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def tool_call_dicts(parsed: Any) -> list[dict]:
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in parsed.tool_calls]


async def collect(gen: Generation, request: Request) -> tuple[str, Any]:
    """Run a non-streaming generation to the end; cancel it if the client goes away meanwhile."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                gen.cancel()
                return

    watcher = asyncio.create_task(watch())
    parts, final = [], None
    try:
        async for chunk in gen:
            parts.append(chunk.text)
            if chunk.finish_reason is not None:
                final = chunk
    finally:
        watcher.cancel()
        gen.cancel()
    return "".join(parts), final


async def _stream(request: Request, gen: Generation, body_iter: AsyncIterator[str], anthropic: bool = False):
    """Wrap an SSE body: stop (and cancel the engine) when the client disconnects; turn an internal error
    into an error event instead of a torn connection."""
    try:
        async for piece in body_iter:
            if await request.is_disconnected():
                gen.cancel()
                return
            yield piece
    except Exception as e:  # the headers are gone already: report in-band
        log.exception("error during a streamed generation")
        msg = f"internal server error ({type(e).__name__}); see the server log"
        if anthropic:
            yield f"event: error\ndata: {json.dumps(error_body(500, msg, True))}\n\n"
        else:
            yield sse(error_body(500, msg, False))
    finally:
        gen.cancel()  # no-op when it already finished; stops it within one decode step otherwise


def stream_response(request: Request, gen: Generation, body_iter: AsyncIterator[str],
                    anthropic: bool = False) -> StreamingResponse:
    return StreamingResponse(_stream(request, gen, body_iter, anthropic), media_type="text/event-stream",
                             headers=SSE_HEADERS)


# ----------------------------------------------------------------------------------------- routes

router = APIRouter(route_class=ErrorHandlingRoute)


def model_card(state: ServerState) -> dict:
    engine = state.engine
    card = {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "kimi-local"}
    if engine is not None:
        ctx = engine.ctx_len
        card.update({
            "context_length": ctx, "max_context_length": ctx, "max_model_len": ctx,
            "capabilities": {"tools": True, "vision": False, "completion_chat": True},
            "meta": {"n_ctx": ctx, "n_ctx_train": engine.args.max_position_embeddings,
                     "n_vocab": engine.args.vocab_size, "n_params": count_params(engine.args),
                     "size": model_size_bytes(state.model_dir)},
            "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
        })
    return card


@router.get("/v1/models")
async def list_models(state: ServerState = Depends(get_state)) -> dict:
    state.require_engine()
    return {"object": "list", "data": [model_card(state)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, state: ServerState = Depends(get_state)) -> dict:
    state.require_engine()
    if model_id != state.model_id:
        raise APIError(404, f"model {model_id!r} not found; this server serves {state.model_id!r}",
                       param="model", code="model_not_found")
    return model_card(state)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           state: ServerState = Depends(get_state)):
    engine = state.require_engine()
    messages = []
    for m in body.messages:
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":  # OpenAI's newer name for the system role
            d["role"] = "system"
        messages.append(d)
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
    choice = _tool_choice(body.tool_choice)
    params = sampling_params(body, body.max_completion_tokens or body.max_tokens)
    prepared = await run_in_threadpool(prepare_chat, engine, state.template, messages, tools, choice)
    cancel = threading.Event()
    chunks = start_engine(engine, prepared.ids, params, cancel, anthropic=False)
    gen = await state.start_generation(chunks, cancel)

    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return stream_response(request, gen, _chat_stream(state, gen, prepared, cid, created, include_usage))

    text, final = await collect(gen, request)
    parsed = parse_full(prepared, text)
    calls = tool_call_dicts(parsed)
    message: dict = {"role": "assistant", "content": parsed.content if (parsed.content or not calls) else None}
    if calls:
        message["tool_calls"] = calls
    t = final.timings if final else None
    return {"id": cid, "object": "chat.completion", "created": created, "model": state.model_id,
            "system_fingerprint": "kimi-local",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish_reason(final.finish_reason if final else None, bool(calls))}],
            "usage": usage_dict(t), "timings": timings_dict(t)}


def _tool_choice(tc: Any) -> ToolChoice:
    if tc is None or isinstance(tc, str):
        return ToolChoice(tc or "auto")
    return ToolChoice("named", tc.function.name)


async def _chat_stream(state: ServerState, gen: Generation, prepared: PreparedPrompt, cid: str, created: int,
                       include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish: Optional[str] = None, **extra: Any) -> str:
        return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                    "system_fingerprint": "kimi-local",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    def delta(ev: Any) -> Optional[dict]:
        if isinstance(ev, cf.ContentDelta):
            return {"content": ev.text} if ev.text else None
        if isinstance(ev, cf.ToolCallStart):
            return {"tool_calls": [{"index": ev.index, "id": ev.id, "type": "function",
                                    "function": {"name": ev.name, "arguments": ""}}]}
        if isinstance(ev, cf.ToolCallArgsDelta):
            return {"tool_calls": [{"index": ev.index, "function": {"arguments": ev.text}}]} if ev.text else None
        return None  # ToolCallEnd has no OpenAI counterpart

    reader = OutputReader(prepared)
    yield chunk({"role": "assistant", "content": ""})
    async for ch in gen:
        for ev in reader.chunk_events(ch):
            d = delta(ev)
            if d is not None:
                yield chunk(d)
    final, parsed = reader.final, reader.parsed
    if final is None or final.finish_reason == "cancelled":
        return
    t = final.timings
    fr = finish_reason(final.finish_reason, bool(parsed.tool_calls))
    if include_usage:
        yield chunk({}, fr, timings=timings_dict(t))
        yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.model_id,
                   "system_fingerprint": "kimi-local", "choices": [], "usage": usage_dict(t),
                   "timings": timings_dict(t)})
    else:
        yield chunk({}, fr, usage=usage_dict(t), timings=timings_dict(t))
    yield "data: [DONE]\n\n"


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, state: ServerState = Depends(get_state)):
    engine = state.require_engine()
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: batches are not supported, send one prompt (got {len(prompt)})",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        # Special-token strings are honoured here (raw-prompt users write chat markers on purpose).
        if not prompt:
            raise APIError(400, "prompt: empty", param="prompt")
        ids = await run_in_threadpool(engine.tokenizer.encode, prompt, True)
        prompt_text = prompt
    else:
        ids = list(prompt)
        if not ids:
            raise APIError(400, "prompt: empty", param="prompt")
        vocab = engine.args.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        prompt_text = engine.tokenizer.decode(ids)
    params = sampling_params(body, body.max_tokens if body.max_tokens is not None else 16)
    cancel = threading.Event()
    chunks = start_engine(engine, ids, params, cancel, anthropic=False)
    gen = await state.start_generation(chunks, cancel)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    echo = prompt_text if body.echo else ""

    def choice(text: str, finish: Optional[str]) -> dict:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

    def obj(choices: list, **extra: Any) -> dict:
        return {"id": cid, "object": "text_completion", "created": created, "model": state.model_id,
                "system_fingerprint": "kimi-local", "choices": choices, **extra}

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[str]:
            if echo:
                yield sse(obj([choice(echo, None)]))
            final = None
            async for ch in gen:
                if ch.text:
                    yield sse(obj([choice(ch.text, None)]))
                if ch.finish_reason is not None:
                    final = ch
            if final is None or final.finish_reason == "cancelled":
                return
            t = final.timings
            fr = "length" if final.finish_reason == "length" else "stop"
            if include_usage:
                yield sse(obj([choice("", fr)], timings=timings_dict(t)))
                yield sse(obj([], usage=usage_dict(t), timings=timings_dict(t)))
            else:
                yield sse(obj([choice("", fr)], usage=usage_dict(t), timings=timings_dict(t)))
            yield "data: [DONE]\n\n"

        return stream_response(request, gen, events())

    text, final = await collect(gen, request)
    t = final.timings if final else None
    fr = "length" if final and final.finish_reason == "length" else "stop"
    return obj([choice(echo + text, fr)], usage=usage_dict(t), timings=timings_dict(t))


# ----------------------------------------------------------------------------------------- model facts

def count_params(args: Any) -> int:
    """Parameter count from the config (MLA attention + dense/MoE FFNs + embeddings), as llama.cpp reports."""
    try:
        h, heads = args.hidden_size, args.num_attention_heads
        qk, v = args.qk_nope_head_dim + args.qk_rope_head_dim, args.v_head_dim
        if args.q_lora_rank:
            q = h * args.q_lora_rank + args.q_lora_rank + args.q_lora_rank * heads * qk
        else:
            q = h * heads * qk
        kv = h * (args.kv_lora_rank + args.qk_rope_head_dim) + args.kv_lora_rank \
            + args.kv_lora_rank * heads * (args.qk_nope_head_dim + v)
        attn = q + kv + heads * v * h + 2 * h
        dense = 3 * h * args.intermediate_size
        moe = (args.n_routed_experts + args.n_shared_experts) * 3 * h * args.moe_intermediate_size \
            + h * args.n_routed_experts + args.n_routed_experts
        layers = sum(attn + (moe if args.is_moe_layer(i) else dense) for i in range(args.num_hidden_layers))
        return int(layers + 2 * args.vocab_size * h + h)
    except (AttributeError, TypeError):
        return 0


def model_size_bytes(model_dir: Optional[str]) -> int:
    if not model_dir or not os.path.isdir(model_dir):
        return 0
    return sum(os.path.getsize(os.path.join(model_dir, f)) for f in os.listdir(model_dir)
               if f.endswith(".safetensors"))
