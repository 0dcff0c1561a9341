"""Anthropic Messages API routes: ``/v1/messages`` and ``/v1/messages/count_tokens`` (what Claude Code speaks).

The request is translated into the OpenAI-style messages the chat format understands:

- ``system`` (a string or text blocks) -> one system message;
- user ``text`` blocks -> the user message; ``tool_result`` blocks -> ``tool`` messages (placed before the
  user's text, as Anthropic requires them first); ``image``/``document`` blocks -> 400 (text-only model);
- assistant ``text`` blocks -> content, ``tool_use`` blocks -> ``tool_calls`` (``input`` as JSON arguments);
  ``thinking`` blocks are dropped;
- ``tools`` (``input_schema``) -> function tools; ``tool_choice`` auto/any/tool/none -> auto/required/named/none.

Temperature follows Moonshot's Anthropic-compatible API: the engine runs at ``0.6 x temperature``, so
Anthropic's default 1.0 is Kimi's recommended 0.6.  ``seed`` is accepted as an extension.
"""

from __future__ import annotations

import json
import threading
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool

from kimi_local import chat_format as cf
from kimi_local.sampling import SamplingParams
from kimi_local.server.errors import APIError, ErrorHandlingRoute
from kimi_local.server.openai_routes import collect, get_state, stream_response
from kimi_local.server.prompting import (OutputReader, PreparedPrompt, ToolChoice, arguments_object, parse_full,
                                         prepare_chat, start_engine, stop_list, timings_dict)
from kimi_local.server.runtime import Generation, ServerState
from kimi_local.server.schemas import CountTokensRequest, MessagesRequest

TEMPERATURE_SCALE = 0.6  # real temperature = request temperature x 0.6 (Kimi-K2 README)

router = APIRouter(route_class=ErrorHandlingRoute)


# ----------------------------------------------------------------------------------------- translation

def _text_of(content: Any, where: str) -> str:
    """Text of a tool_result's content: a string or a list of text blocks."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            parts.append(block["text"])
        elif kind in ("image", "document"):
            raise APIError(400, f"{where}: {kind} content is not supported (text-only model)", param=where)
        else:
            raise APIError(400, f"{where}: unsupported block type {kind!r} in tool_result content", param=where)
    return "\n".join(parts)


def to_chat(body: CountTokensRequest) -> tuple[list[dict], Optional[list[dict]], ToolChoice]:
    """Anthropic request -> (OpenAI-style messages, tools, tool choice)."""
    messages: list[dict] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "\n".join(b.text for b in body.system)
        messages.append({"role": "system", "content": system})
    tool_names: dict[str, str] = {}
    for i, m in enumerate(body.messages):
        where = f"messages.{i}.content"
        if isinstance(m.content, str):
            messages.append({"role": m.role, "content": m.content})
            continue
        texts: list[str] = []
        calls: list[dict] = []
        results: list[dict] = []
        for j, b in enumerate(m.content):
            w = f"{where}.{j}"
            if b.type == "text":
                texts.append(b.text or "")
            elif b.type == "tool_use" and m.role == "assistant":
                if not b.id or not b.name:
                    raise APIError(400, f"{w}: tool_use blocks need 'id' and 'name'", param=w)
                tool_names[b.id] = b.name
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": json.dumps(
                                  b.input if b.input is not None else {}, ensure_ascii=False)}})
            elif b.type == "tool_result" and m.role == "user":
                if not b.tool_use_id:
                    raise APIError(400, f"{w}: tool_result blocks need 'tool_use_id'", param=w)
                text = _text_of(b.content, w)
                if b.is_error:
                    text = f"Error: {text}"
                result = {"role": "tool", "tool_call_id": b.tool_use_id, "content": text}
                if b.tool_use_id in tool_names:
                    result["name"] = tool_names[b.tool_use_id]
                results.append(result)
            elif b.type in ("thinking", "redacted_thinking"):
                continue
            elif b.type in ("image", "document"):
                raise APIError(400, f"{w}: {b.type} blocks are not supported (text-only model)", param=w)
            else:
                raise APIError(400, f"{w}: block type {b.type!r} is not supported in a {m.role} message", param=w)
        messages.extend(results)
        if m.role == "assistant":
            msg: dict = {"role": "assistant", "content": "".join(texts)}
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
        elif texts or not results:
            messages.append({"role": "user", "content": "\n".join(texts)})
    tools = None
    if body.tools:
        tools = [{"type": "function", "function": {
            "name": t.name, "description": t.description or "",
            "parameters": t.input_schema if t.input_schema is not None else {"type": "object", "properties": {}}}}
            for t in body.tools]
    choice = ToolChoice("auto")
    if body.tool_choice is not None:
        kind = body.tool_choice.type
        if kind == "tool":
            if not body.tool_choice.name:
                raise APIError(400, "tool_choice: type 'tool' needs a 'name'", param="tool_choice")
            choice = ToolChoice("named", body.tool_choice.name)
        else:
            choice = ToolChoice({"auto": "auto", "any": "required", "none": "none"}[kind])
    return messages, tools, choice


def _prepare(state: ServerState, body: CountTokensRequest) -> PreparedPrompt:
    engine = state.require_engine()
    messages, tools, choice = to_chat(body)
    return prepare_chat(engine, state.template, messages, tools, choice)


# ----------------------------------------------------------------------------------------- routes

@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, state: ServerState = Depends(get_state)) -> dict:
    prepared = await run_in_threadpool(_prepare, state, body)
    return {"input_tokens": len(prepared.ids)}


def stop_reason(final: Any, params: SamplingParams, has_tool_calls: bool) -> tuple[str, Optional[str]]:
    if final is not None and final.finish_reason == "length":
        return "max_tokens", None
    if has_tool_calls:
        return "tool_use", None
    if final is not None and final.stop_reason is not None and final.stop_reason in params.stop:
        return "stop_sequence", final.stop_reason
    return "end_turn", None


def usage_dict(t: Any, prompt_tokens: int) -> dict:
    cached = t.cached_tokens if t is not None else 0
    return {"input_tokens": t.prompt_tokens if t is not None else prompt_tokens,
            "output_tokens": t.generated_tokens if t is not None else 0,
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request, state: ServerState = Depends(get_state)):
    engine = state.require_engine()
    temperature = TEMPERATURE_SCALE * (1.0 if body.temperature is None else body.temperature)
    kw = {"seed": body.seed} if body.seed is not None else {}
    if body.top_p is not None:
        kw["top_p"] = body.top_p
    if body.top_k is not None:
        kw["top_k"] = body.top_k
    params = SamplingParams(temperature=temperature, max_tokens=body.max_tokens,
                            stop=stop_list(body.stop_sequences, "stop_sequences"), **kw)
    prepared = await run_in_threadpool(_prepare, state, body)
    cancel = threading.Event()
    chunks = start_engine(engine, prepared.ids, params, cancel, anthropic=True)
    gen = await state.start_generation(chunks, cancel)
    mid = f"msg_{uuid.uuid4().hex}"

    if body.stream:
        return stream_response(request, gen, _message_stream(state, gen, prepared, params, mid), anthropic=True)

    text, final = await collect(gen, request)
    parsed = parse_full(prepared, text)
    content: list[dict] = []
    if parsed.content:
        content.append({"type": "text", "text": parsed.content})
    for c in parsed.tool_calls:
        content.append({"type": "tool_use", "id": c.id, "name": c.name, "input": arguments_object(c.arguments)})
    reason, sequence = stop_reason(final, params, bool(parsed.tool_calls))
    t = final.timings if final else None
    return {"id": mid, "type": "message", "role": "assistant", "model": state.model_id, "content": content,
            "stop_reason": reason, "stop_sequence": sequence, "usage": usage_dict(t, len(prepared.ids)),
            "timings": timings_dict(t)}


def event(kind: str, data: dict) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


async def _message_stream(state: ServerState, gen: Generation, prepared: PreparedPrompt, params: SamplingParams,
                          mid: str) -> AsyncIterator[str]:
    """message_start, ping, then per block content_block_start / *_delta / content_block_stop, then
    message_delta (stop_reason, usage) and message_stop.

    Text streams as it is generated.  A tool call's ``input_json_delta`` is sent when the call closes, as one
    piece of valid JSON (what non-streaming ``input`` holds), rather than as raw fragments: the Anthropic SDKs
    parse the accumulated ``partial_json`` on every delta and fail on text that cannot become JSON."""
    yield event("message_start", {"message": {
        "id": mid, "type": "message", "role": "assistant", "model": state.model_id, "content": [],
        "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": len(prepared.ids), "output_tokens": 0}}})
    yield event("ping", {})
    reader = OutputReader(prepared)
    index = -1          # index of the current content block
    open_kind = None    # "text" | "tool_use" | None
    tool_blocks: dict[int, int] = {}  # parser tool index -> content block index
    args_buf: dict[int, str] = {}     # parser tool index -> argument text so far
    current_tool = -1                 # parser index of the open tool_use block

    def flush_args(tool_index: int) -> list[str]:
        """The call's arguments as one input_json_delta holding a JSON object (``{}`` if the model's text
        is not one): clients parse the concatenated partial_json, and invalid JSON would break them."""
        text = json.dumps(arguments_object(args_buf.pop(tool_index, "")), ensure_ascii=False)
        return [event("content_block_delta", {"index": index, "delta": {
            "type": "input_json_delta", "partial_json": text}})]

    def close() -> list[str]:
        nonlocal open_kind
        if open_kind is None:
            return []
        open_kind = None
        return [event("content_block_stop", {"index": index})]

    async for ch in gen:
        for ev in reader.chunk_events(ch):
            out: list[str] = []
            if isinstance(ev, cf.ContentDelta):
                if not ev.text:
                    continue
                if open_kind != "text":
                    out += close()
                    index += 1
                    open_kind = "text"
                    out.append(event("content_block_start",
                                     {"index": index, "content_block": {"type": "text", "text": ""}}))
                out.append(event("content_block_delta",
                                 {"index": index, "delta": {"type": "text_delta", "text": ev.text}}))
            elif isinstance(ev, cf.ToolCallStart):
                out += close()
                index += 1
                open_kind = "tool_use"
                current_tool = ev.index
                tool_blocks[ev.index] = index
                out.append(event("content_block_start", {"index": index, "content_block": {
                    "type": "tool_use", "id": ev.id, "name": ev.name, "input": {}}}))
            elif isinstance(ev, cf.ToolCallArgsDelta):
                if tool_blocks.get(ev.index) == index and open_kind == "tool_use":
                    args_buf[ev.index] = args_buf.get(ev.index, "") + ev.text
            elif isinstance(ev, cf.ToolCallEnd):
                if tool_blocks.get(ev.index) == index and open_kind == "tool_use":
                    out += flush_args(ev.index)
                    out += close()
            for piece in out:
                yield piece
    final, parsed = reader.final, reader.parsed
    if final is None or final.finish_reason == "cancelled":
        return
    tail = flush_args(current_tool) if open_kind == "tool_use" else []  # defensive: the parser closes calls
    for piece in tail + close():
        yield piece
    reason, sequence = stop_reason(final, params, bool(parsed.tool_calls))
    t = final.timings
    yield event("message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence},
                                  "usage": usage_dict(t, len(prepared.ids)), "timings": timings_dict(t)})
    yield event("message_stop", {})
