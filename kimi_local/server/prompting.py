"""What the OpenAI and Anthropic adapters share: building the prompt, starting the engine, reading the output.

``tool_choice`` is implemented on the prompt side, with no grammar-constrained decoding:

- ``auto``: the tools are declared (the template's ``tool_declare`` turn) and the model decides.
- ``none``: the conversation is rendered *without* the tool declaration, so the model has nothing to call;
  a tool-call section it emits anyway is parsed away (never shown as text) and no call is returned.
- ``required``: the tools are declared and the generation prompt ends with ``<|tool_calls_section_begin|>``,
  so the model's first tokens are inside a tool-call section and it only picks which function to call.
- a named function: the prompt ends with
  ``<|tool_calls_section_begin|><|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>``, so the
  model writes only that call's JSON arguments (the same prefix SGLang's structural tag forces).

The forced prefix counts as prompt tokens.  The output parser is fed the prefix before the generated text,
so the response looks exactly as if the model had produced the markers itself.  With no tools declared (or
``none``) any tool-call section is dropped, so a model never returns calls to functions the client does not
have, and the markers never leak into content.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional

from kimi_local import chat_format as cf
from kimi_local.engine import ContextOverflowError
from kimi_local.sampling import SamplingParams
from kimi_local.server.errors import APIError
from kimi_local.server.schemas import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES

SECTION_BEGIN = "<|tool_calls_section_begin|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"


@dataclass
class ToolChoice:
    mode: str = "auto"            # auto | none | required | named
    name: Optional[str] = None    # the function, when mode == "named"


@dataclass
class PreparedPrompt:
    ids: list[int]
    forced: str = ""              # text appended after the generation prompt; the parser sees it first
    tools_enabled: bool = False   # False: tool calls in the output are dropped
    id_map: dict = field(default_factory=dict)
    tool_names: list = field(default_factory=list)


def check_tool_choice(choice: ToolChoice, tools: Optional[list[dict]], param: str = "tool_choice") -> None:
    names = [t["function"]["name"] for t in tools or []]
    if choice.mode in ("required", "named") and not names:
        raise APIError(400, f"{param} '{choice.mode}' needs at least one tool in 'tools'", param=param)
    if choice.mode == "named" and choice.name not in names:
        raise APIError(400, f"{param} names function {choice.name!r}, which is not among the declared tools "
                            f"({', '.join(names)})", param=param)


def prepare_chat(engine: Any, template: Optional[str], messages: list[dict], tools: Optional[list[dict]],
                 choice: ToolChoice) -> PreparedPrompt:
    """Validate and render a conversation (OpenAI message dicts) into prompt token ids."""
    check_tool_choice(choice, tools)
    msgs, id_map = cf.normalize_messages(messages, tools)
    declared = tools if tools and choice.mode != "none" else None
    ids = cf.encode_conversation(engine.tokenizer, msgs, tools=declared, template=template,
                                 add_generation_prompt=True)
    forced = ""
    if declared and choice.mode == "required":
        forced = SECTION_BEGIN
    elif declared and choice.mode == "named":
        forced = f"{SECTION_BEGIN}{CALL_BEGIN}functions.{choice.name}:0{ARG_BEGIN}"
    if forced:
        ids = list(ids) + engine.tokenizer.encode(forced, allow_special=True)
    names = [t["function"]["name"] for t in declared or []]
    return PreparedPrompt(list(ids), forced, bool(declared), id_map, names)


def stop_list(stop: Any, param: str = "stop") -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"{param}: at most {MAX_STOP_SEQUENCES} stop sequences, got {len(stops)}", param=param)
    for s in stops:
        if not s:
            raise APIError(400, f"{param}: stop sequences must be non-empty strings", param=param)
        if len(s) > MAX_STOP_LENGTH:
            raise APIError(400, f"{param}: a stop sequence is longer than {MAX_STOP_LENGTH} characters",
                           param=param)
    return stops


def start_engine(engine: Any, prompt_ids: list[int], params: SamplingParams, cancel: threading.Event,
                 anthropic: bool) -> Iterator:
    """``engine.generate`` with its up-front errors turned into 400s worded the way each API's clients
    recognise (Cline and others match "maximum context length"; Claude Code matches "prompt is too long")."""
    try:
        return engine.generate(prompt_ids, params, cancel)
    except ContextOverflowError as e:
        if anthropic:
            msg = f"prompt is too long: {e.prompt_tokens} tokens > {e.ctx_len - 1} maximum " \
                  f"(context window {e.ctx_len} tokens)"
        else:
            msg = (f"This model's maximum context length is {e.ctx_len} tokens. However, your messages "
                   f"resulted in {e.prompt_tokens} tokens. Please reduce the length of the messages.")
        raise APIError(400, msg, param="messages", code="context_length_exceeded") from None


def timings_dict(t: Any) -> dict:
    """llama.cpp's ``timings`` object (plus the engine's own names), from an engine ``Timings``."""
    if t is None:
        return {}
    prompt_n = t.prompt_tokens - t.cached_tokens
    return {
        "cache_n": t.cached_tokens,
        "prompt_n": prompt_n,
        "prompt_ms": t.prefill_seconds * 1e3,
        "prompt_per_token_ms": t.prefill_seconds * 1e3 / prompt_n if prompt_n else 0.0,
        "prompt_per_second": t.prefill_tok_s,
        "predicted_n": t.generated_tokens,
        "predicted_ms": t.decode_seconds * 1e3,
        "predicted_per_token_ms": t.decode_seconds * 1e3 / t.generated_tokens if t.generated_tokens else 0.0,
        "predicted_per_second": t.decode_tok_s,
    }


class OutputReader:
    """Generated text -> content and tool-call events (streaming) and the final parsed output.

    Wraps chat_format's ``ToolCallStreamParser``: feeds it the forced prefix first, and drops tool-call
    events when tools are not enabled (see the module docstring).
    """

    def __init__(self, prepared: PreparedPrompt):
        self.parser = cf.ToolCallStreamParser(prepared.tool_names or None)
        self._pending = prepared.forced
        self.tools_enabled = prepared.tools_enabled
        self.text = ""
        self.final = None    # the engine's last chunk, once seen
        self.parsed = None   # the whole output parsed, once the last chunk is seen

    def _keep(self, events: list) -> list:
        if self.tools_enabled:
            return list(events)
        return [e for e in events if isinstance(e, cf.ContentDelta)]

    def feed(self, text: str) -> list:
        self.text += text
        text, self._pending = self._pending + text, ""
        return self._keep(self.parser.feed(text)) if text else []

    def chunk_events(self, ch) -> list:
        """Events of one engine chunk; the last chunk (with ``finish_reason``) also closes the parse and
        sets ``final`` and ``parsed``."""
        events = self.feed(ch.text) if ch.text else []
        if ch.finish_reason is not None:
            self.final = ch
            more, self.parsed = self.finish()
            events += more
        return events

    def finish(self) -> tuple[list, Any]:
        events = self.feed("") if self._pending else []
        more, parsed = self.parser.finish()
        events += self._keep(more)
        if not self.tools_enabled and parsed.tool_calls:
            parsed = replace(parsed, tool_calls=[])
        return [e for e in events if not (isinstance(e, cf.ContentDelta) and not e.text)], parsed


def parse_full(prepared: PreparedPrompt, text: str) -> Any:
    """The non-streaming counterpart of :class:`OutputReader`."""
    parsed = cf.parse_output(prepared.forced + text, prepared.tool_names or None)
    if not prepared.tools_enabled and parsed.tool_calls:
        parsed = replace(parsed, tool_calls=[])
    return parsed


def arguments_object(arguments: str) -> dict:
    """Tool-call arguments as the JSON object Anthropic's ``tool_use.input`` needs ({} when not an object)."""
    try:
        value = json.loads(arguments) if arguments and arguments.strip() else {}
    except (ValueError, TypeError):
        return {}
    return value if isinstance(value, dict) else {}
