"""Kimi-K2 chat format: prompt rendering, safe tokenization, and tool-call output parsing.

Protocol facts live in ``shared/docs/kimi-k2-format.md`` (§9.4 special tokens, §10 chat template, §11 tool calls).

- :func:`render_jinja` renders a checkpoint's ``chat_template.jinja`` exactly as Hugging Face does.
- :func:`render_builtin` is a pure-Python renderer of the same rules as our shipped
  ``kimi_local/data/chat_template.jinja`` (byte-identical output; tests hold the two together).
- :func:`normalize_messages` validates OpenAI-style conversations and rewrites foreign tool-call ids to
  K2's ``functions.{name}:{idx}`` form.
- :func:`encode_conversation` renders and tokenizes so that template control markers become special ids
  while special-token strings inside message text stay plain text.
- :func:`parse_output` and :class:`ToolCallStreamParser` turn model output text (special tokens decoded to
  their strings) into content and tool calls, whole or incrementally.  Malformed output never raises.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from typing import Any, Optional, Sequence, Union

from kimi_local.errors import UserError

__all__ = [
    "ChatFormatError", "ChatTemplateError", "DEFAULT_SYSTEM_PROMPT", "TOOL_MARKERS",
    "builtin_template", "render_jinja", "render_builtin", "render_prompt", "normalize_messages",
    "encode_conversation", "ToolCall", "ParsedOutput", "ContentDelta", "ToolCallStart", "ToolCallArgsDelta",
    "ToolCallEnd", "ToolCallStreamParser", "parse_output",
]

DEFAULT_SYSTEM_PROMPT = "You are Kimi, an AI assistant created by Moonshot AI."

IM_END = "<|im_end|>"
IM_USER = "<|im_user|>"
IM_ASSISTANT = "<|im_assistant|>"
IM_SYSTEM = "<|im_system|>"
IM_MIDDLE = "<|im_middle|>"
EOS = "[EOS]"
SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
TOOL_MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END)
# The real template's image placeholder, trailing newline included (it sits outside a whitespace-control tag).
MEDIA_PLACEHOLDER = "<|media_start|>image<|media_content|><|media_pad|><|media_end|>\n"

_ROLES = ("system", "user", "assistant", "tool")
_ROLE_TOKEN = {"user": IM_USER, "assistant": IM_ASSISTANT}  # every other role uses <|im_system|>
_K2_ID_RE = re.compile(r"functions\.(.+):(\d+)", re.DOTALL)


class ChatFormatError(UserError):
    """A conversation or tool list that cannot be rendered (names the message index and field)."""


class ChatTemplateError(UserError):
    """A chat template that does not compile or fails while rendering."""


# ---------------------------------------------------------------------------------------------- rendering


def builtin_template() -> str:
    """Text of the shipped ``chat_template.jinja`` (the tiny-model builder copies this file)."""
    return resources.files("kimi_local").joinpath("data/chat_template.jinja").read_text(encoding="utf-8")


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' override: keeps non-ASCII and does not HTML-escape (jinja's own tojson does).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile(template_str: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Same environment as transformers' apply_chat_template.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template_str)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not compile: {e.message} (line {e.lineno})") from None


def render_jinja(template_str: str, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
                 add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render ``messages`` with a jinja2 chat template, configured exactly as Hugging Face does.

    Sandboxed (ImmutableSandboxedEnvironment), ``trim_blocks``/``lstrip_blocks``, the loopcontrols
    extension, a ``tojson`` that keeps non-ASCII, and the ``raise_exception``/``strftime_now`` globals.
    ``extra`` becomes additional template variables (e.g. ``bos_token``).  Any template failure raises
    :class:`ChatTemplateError`.
    """
    import jinja2

    template = _compile(template_str)
    try:
        return template.render(messages=list(messages), tools=list(tools) if tools else None,
                               add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template failed: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
        # Python errors raised from inside the template (a filter given a bad value, ...).
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def _is_image_part(part: dict) -> bool:
    # The template's own test, in the same order.
    return part.get("type") == "image" or "image" in part or "image_url" in part


def _render_content(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(MEDIA_PLACEHOLDER if _is_image_part(p) else p["text"] for p in content)


def _render_tool_calls(calls: Sequence[dict]) -> str:
    out = [SECTION_BEGIN]
    for call in calls:
        args = call["function"]["arguments"]
        out.append(CALL_BEGIN + call.get("id", "") + ARG_BEGIN
                   + (args if isinstance(args, str) else _tojson(args)) + CALL_END)
    out.append(SECTION_END)
    return "".join(out)


def render_builtin(messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
                   add_generation_prompt: bool = True) -> str:
    """Render a conversation to K2's prompt text in pure Python.

    Byte-identical to ``render_jinja(builtin_template(), ...)`` for every conversation it accepts.
    Messages are checked structurally (roles, content types, tool-call shape) and bad input raises
    :class:`ChatFormatError`; tool-call ids are used as given (see :func:`normalize_messages`).
    """
    _check_messages(messages)
    if tools:
        _check_tools(tools)
    out: list[str] = []
    if tools:
        out.append(f"{IM_SYSTEM}tool_declare{IM_MIDDLE}{_tojson(list(tools), separators=(',', ':'))}{IM_END}")
    if not messages or messages[0]["role"] != "system":
        out.append(f"{IM_SYSTEM}system{IM_MIDDLE}{DEFAULT_SYSTEM_PROMPT}{IM_END}")
    for m in messages:
        role = m["role"]
        out.append(_ROLE_TOKEN.get(role, IM_SYSTEM) + (m.get("name") or role) + IM_MIDDLE)
        if role == "assistant":
            out.append(_render_content(m.get("content")))
            if m.get("tool_calls"):
                out.append(_render_tool_calls(m["tool_calls"]))
        elif role == "tool":
            out.append(f"## Return of {m['tool_call_id']}\n{_render_content(m.get('content'))}")
        else:
            out.append(_render_content(m.get("content")))
        out.append(IM_END)
    if add_generation_prompt:
        out.append(f"{IM_ASSISTANT}assistant{IM_MIDDLE}")
    return "".join(out)


def render_prompt(messages: Sequence[dict], tools: Optional[Sequence[dict]] = None, template: Optional[str] = None,
                  add_generation_prompt: bool = True) -> str:
    """Prompt text: the given jinja template if not None (a checkpoint's own), else the built-in renderer."""
    if template is not None:
        return render_jinja(template, messages, tools, add_generation_prompt)
    return render_builtin(messages, tools, add_generation_prompt)


# ---------------------------------------------------------------------------------------------- validation


def _type_name(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _check_content(where: str, content: Any, allow_none: bool) -> None:
    if content is None:
        if not allow_none:
            raise ChatFormatError(f"{where}: content is required for this role")
        return
    if isinstance(content, str):
        return
    if not isinstance(content, (list, tuple)):
        raise ChatFormatError(f"{where}: expected a string, a list of content parts or null, got {_type_name(content)}")
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise ChatFormatError(f"{pw}: a content part must be an object, got {_type_name(part)}")
        if _is_image_part(part):
            continue
        if part.get("type", "text") != "text":
            raise ChatFormatError(f"{pw}: unsupported content part type {part.get('type')!r} (text and image only)")
        if not isinstance(part.get("text"), str):
            raise ChatFormatError(f"{pw}.text: expected a string, got {_type_name(part.get('text'))}")


def _check_tool_call(where: str, call: Any) -> None:
    if not isinstance(call, dict):
        raise ChatFormatError(f"{where}: a tool call must be an object, got {_type_name(call)}")
    if call.get("type", "function") != "function":
        raise ChatFormatError(f"{where}.type: only 'function' tool calls are supported, got {call.get('type')!r}")
    if "id" in call and not isinstance(call["id"], str):
        raise ChatFormatError(f"{where}.id: expected a string, got {_type_name(call['id'])}")
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise ChatFormatError(f"{where}.function: expected an object with 'name' and 'arguments'")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ChatFormatError(f"{where}.function.name: expected a non-empty string")
    if not isinstance(fn.get("arguments"), (str, dict)):
        raise ChatFormatError(f"{where}.function.arguments: expected a JSON string or an object, "
                              f"got {_type_name(fn.get('arguments'))}")


def _check_message(i: int, m: Any) -> None:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise ChatFormatError(f"{where}: a message must be an object, got {_type_name(m)}")
    role = m.get("role")
    if role not in _ROLES:
        raise ChatFormatError(f"{where}.role: unknown role {role!r} (expected one of {', '.join(_ROLES)})")
    if m.get("name") is not None and not isinstance(m["name"], str):
        raise ChatFormatError(f"{where}.name: expected a string, got {_type_name(m['name'])}")
    # Only assistant turns may omit content (a turn that only calls tools).
    _check_content(f"{where}.content", m.get("content"), allow_none=(role == "assistant"))
    calls = m.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise ChatFormatError(f"{where}.tool_calls: only assistant messages carry tool calls")
        if not isinstance(calls, (list, tuple)):
            raise ChatFormatError(f"{where}.tool_calls: expected a list, got {_type_name(calls)}")
        for j, call in enumerate(calls):
            _check_tool_call(f"{where}.tool_calls[{j}]", call)
    if role == "tool" and not isinstance(m.get("tool_call_id"), str):
        raise ChatFormatError(f"{where}.tool_call_id: a tool result needs the id of the call it answers")


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"messages: expected a list, got {_type_name(messages)}")
    for i, m in enumerate(messages):
        _check_message(i, m)


def _check_tools(tools: Any) -> None:
    if not isinstance(tools, (list, tuple)):
        raise ChatFormatError(f"tools: expected a list, got {_type_name(tools)}")
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict):
            raise ChatFormatError(f"{where}: a tool must be an object, got {_type_name(t)}")
        if t.get("type", "function") != "function":
            raise ChatFormatError(f"{where}.type: only 'function' tools are supported, got {t.get('type')!r}")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ChatFormatError(f"{where}.function: expected an object like "
                                  "{\"name\": ..., \"description\": ..., \"parameters\": {...}}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"{where}.function.name: expected a non-empty string")
        if "parameters" in fn and not isinstance(fn["parameters"], dict):
            raise ChatFormatError(f"{where}.function.parameters: expected a JSON schema object")


def normalize_messages(messages: Sequence[dict], tools: Optional[Sequence[dict]] = None
                       ) -> tuple[list[dict], dict[str, str]]:
    """Validate a conversation and give every tool call a K2 id.

    Returns ``(messages, id_map)``: a deep copy of ``messages`` in which tool-call ids not of the form
    ``functions.{name}:{idx}`` (e.g. OpenAI's ``call_abc123``) are rewritten to that form, ``idx`` being the
    call's 0-based position in its assistant turn, both in the call and in the tool results answering it
    (null content becomes ""); and ``id_map``, client id -> K2 id, so responses can speak the client's ids.  Calls without an id get
    one too.  Raises :class:`ChatFormatError` naming the message index and field on bad input: an unknown
    role, content of the wrong type, a malformed tool call or tool schema, or a tool result whose
    ``tool_call_id`` matches no earlier tool call.
    """
    _check_messages(messages)
    if tools:
        _check_tools(tools)
    out = copy.deepcopy(list(messages))
    id_map: dict[str, str] = {}
    alias: dict[str, str] = {}   # client id -> K2 id of its most recent use (results answer the latest call)
    known: set[str] = set()      # K2 ids of every call so far
    for i, m in enumerate(out):
        if m.get("content") is None:
            m["content"] = ""  # renders the same, and older templates (July 2025) iterate null content
        if m["role"] == "assistant" and m.get("tool_calls"):
            for idx, call in enumerate(m["tool_calls"]):
                cid = call.get("id") or ""
                if _K2_ID_RE.fullmatch(cid):
                    new = cid  # already K2's form (maybe one we returned earlier): keep it
                else:
                    new = f"functions.{call['function']['name']}:{idx}"
                    if cid:
                        id_map[cid] = new
                        alias[cid] = new
                call["id"] = new
                known.add(new)
        elif m["role"] == "tool":
            tcid = m["tool_call_id"]
            if tcid in alias:
                m["tool_call_id"] = alias[tcid]
            elif tcid not in known:
                raise ChatFormatError(f"messages[{i}].tool_call_id: {tcid!r} does not match any tool call "
                                      "of an earlier assistant message")
    return out, id_map


# ---------------------------------------------------------------------------------------------- tokenizing


@functools.lru_cache(maxsize=4)
def _special_matchers(specials: tuple[str, ...]):
    """(regex finding any special, set of their proper prefixes, of their proper suffixes, longest length)."""
    regex = re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)))
    prefixes = frozenset(s[:k] for s in specials for k in range(1, len(s)))
    suffixes = frozenset(s[-k:] for s in specials for k in range(1, len(s)))
    return regex, prefixes, suffixes, max((len(s) for s in specials), default=0)


def _is_risky(s: str, matchers) -> bool:
    """True if ``s`` contains a special-token string or could complete one together with neighbouring text."""
    regex, prefixes, suffixes, longest = matchers
    if not s:
        return False
    if regex.search(s):
        return True
    for k in range(1, min(longest, len(s) + 1)):
        if s[-k:] in prefixes or s[:k] in suffixes:
            return True
    return False


def _wrap_strings(value: Any, wrap) -> Any:
    """Copy of ``value`` (nested dicts/lists) with ``wrap`` applied to every string, dict keys included."""
    if isinstance(value, str):
        return wrap(value)
    if isinstance(value, dict):
        return {wrap(k) if isinstance(k, str) else k: _wrap_strings(v, wrap) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_wrap_strings(v, wrap) for v in value]
    return value


def _any_string(value: Any, pred) -> bool:
    if isinstance(value, str):
        return pred(value)
    if isinstance(value, dict):
        return any((isinstance(k, str) and pred(k)) or _any_string(v, pred) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_any_string(v, pred) for v in value)
    return False


def encode_conversation(tokenizer, messages: Sequence[dict], tools: Optional[Sequence[dict]] = None,
                        template: Optional[str] = None, add_generation_prompt: bool = True) -> list[int]:
    """Render a conversation and tokenize it without special-token injection.

    Rendering uses ``template`` (jinja source, e.g. the checkpoint's ``chat_template.jinja``) when given,
    else :func:`render_builtin`.  Control markers written by the template become special ids; special-token
    strings inside message text, names, ids, arguments or tool schemas are encoded as plain text.  When no
    such string is present the result equals ``tokenizer.encode(prompt, allow_special=True)``, i.e. what
    Hugging Face's tokenizing ``apply_chat_template`` gives.

    ``tokenizer`` needs ``encode(text, allow_special=False)`` (plain text when False) and ``special_ids``.
    """
    _check_messages(messages)  # the jinja path does not validate by itself
    matchers = _special_matchers(tuple(sorted(tokenizer.special_ids)))
    special_re = matchers[0]
    plain = render_prompt(messages, tools, template, add_generation_prompt)
    risky = functools.partial(_is_risky, matchers=matchers)
    if not (_any_string(list(messages), risky) or _any_string(list(tools or []), risky)):
        return tokenizer.encode(plain, allow_special=True)  # nothing user-supplied can form a special token

    # Wrap each risky string in random alphanumeric brackets (they survive tojson/escaping unchanged),
    # render again, and treat bracketed spans as plain text.
    nonce = secrets.token_hex(8)
    while nonce in plain:
        nonce = secrets.token_hex(8)
    open_m, close_m = f"KIMIo{nonce}", f"KIMIc{nonce}"

    def wrap(s: str) -> str:
        # Only risky strings are wrapped, so values templates branch on ('user', 'image', ...) stay intact;
        # a template that inspects a wrapped string is caught by the comparison below.
        return open_m + s + close_m if risky(s) else s

    marked = render_prompt(_wrap_strings(list(messages), wrap), _wrap_strings(list(tools), wrap) if tools else None,
                           template, add_generation_prompt)
    if marked.replace(open_m, "").replace(close_m, "") != plain:
        raise ChatTemplateError("this chat template transforms message text, so text containing special-token "
                                "strings cannot be tokenized safely with it")
    ids: list[int] = []
    run: list[str] = []  # plain text pending; merged across span edges so BPE sees it as one string

    def flush() -> None:
        if run:
            ids.extend(tokenizer.encode("".join(run), allow_special=False))
            run.clear()

    depth = 0
    for piece in re.split(f"({open_m}|{close_m})", marked):
        if piece == open_m:
            depth += 1
        elif piece == close_m:
            depth -= 1
        elif depth > 0:
            run.append(piece)
        else:
            pos = 0
            for m in special_re.finditer(piece):
                run.append(piece[pos:m.start()])
                flush()
                ids.append(tokenizer.special_ids[m.group()])
                pos = m.end()
            run.append(piece[pos:])
    flush()
    return ids


# ---------------------------------------------------------------------------------------------- parsing


@dataclass
class ToolCall:
    """One parsed tool call.  ``arguments`` is the raw (stripped) argument text."""

    index: int
    id: str
    name: str
    arguments: str
    valid_json: bool
    complete: bool = True  # False when the output ended (or the call was cut off) before <|tool_call_end|>

    def to_openai(self, id: Optional[str] = None) -> dict:
        """OpenAI ``tool_calls`` entry (``id`` overrides the model's, e.g. to restore a client's id)."""
        return {"id": id or self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedOutput:
    """Model output split into content and tool calls.

    ``malformed`` is True when anything deviated from the grammar; ``problems`` says what, one line each.
    Marker strings never reach ``content`` (§11.3): a stray marker is dropped and noted in ``problems``.
    The text of malformed pieces stays visible: an unfinished or nameless call header keeps its text (without
    its markers) in ``content``; a call with bad or truncated arguments is kept with ``valid_json=False``
    (and ``complete=False`` when it was never closed).
    """

    content: str
    tool_calls: list[ToolCall]
    malformed: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def finish_reason(self) -> str:
        """``"tool_calls"`` when at least one call parsed, else ``"stop"``."""
        return "tool_calls" if self.tool_calls else "stop"


@dataclass(frozen=True)
class ContentDelta:
    """Assistant text (never well-formed marker text)."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """A call opened: sent when ``<|tool_call_argument_begin|>`` arrives, so id and name are complete."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    """More argument text of call ``index`` (surrounding whitespace excluded)."""

    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    """Call ``index`` closed (by its end marker, or implicitly when the output broke off)."""

    index: int


StreamEvent = Union[ContentDelta, ToolCallStart, ToolCallArgsDelta, ToolCallEnd]

_TURN_END = (IM_END, EOS)
_MARKERS = TOOL_MARKERS + _TURN_END
_MARKER_RE = re.compile("|".join(re.escape(m) for m in sorted(_MARKERS, key=len, reverse=True)))
_MARKER_PREFIXES = {m[:k] for m in _MARKERS for k in range(1, len(m))}
_LONGEST_MARKER = max(len(m) for m in _MARKERS)
_MAX_ID_LEN = 256  # a call header longer than this is not a call: show it as text instead of holding it back

# Parser states.
_TEXT, _SECTION, _ID, _ARGS, _DEAD_CALL, _DONE = "text", "section", "id", "args", "dead_call", "done"


def _call_name(call_id: str, tool_names: Optional[Sequence[str]]) -> str:
    """§11.3: strip a leading ``functions.``, keep the text before the last ``:IDX``; prefer declared names."""
    body = call_id[len("functions."):] if call_id.startswith("functions.") else call_id
    head, sep, tail = body.rpartition(":")
    name = head if sep and tail.isdigit() else body
    if tool_names and name not in tool_names:
        # Other stacks' readings (last dotted segment; id without the prefix stripped) may name a declared tool.
        full = call_id.rpartition(":")[0] if ":" in call_id else call_id
        for cand in (name.rsplit(".", 1)[-1], full):
            if cand in tool_names:
                return cand
    return name


class ToolCallStreamParser:
    """Incremental parser of K2 output text into content and tool calls (§11.3).

    ``feed(delta)`` returns events as soon as they are certain; text that may be the start of a marker is
    held back, so marker text is never emitted as content.  ``finish()`` flushes and returns the last events
    with the final :class:`ParsedOutput`.  Feeding the same text in any split gives the same final result
    and the same concatenated content and per-call argument text, and the events always add up to the final
    result: concatenated ContentDelta text == ``content``; a call's ArgsDelta text == its ``arguments``.

    Output after ``<|im_end|>`` or ``[EOS]`` is ignored.  ``tool_names`` (declared tools) helps resolve names
    when the model's id is odd.
    """

    def __init__(self, tool_names: Optional[Sequence[str]] = None):
        self._tool_names = list(tool_names) if tool_names else None
        self._buf = ""           # unprocessed text (may end with a partial marker)
        self._state = _TEXT
        self._junk = False       # in _SECTION: non-whitespace text seen since the last marker
        self._id_buf = ""        # raw text between <|tool_call_begin|> and <|tool_call_argument_begin|>
        self._dead_head = ""     # header of a call that could not be opened (kept as text)
        self._args_started = False
        self._ws_hold = ""       # trailing whitespace of the current arguments, emitted only if more follows
        self._calls: list[ToolCall] = []
        self._args: list[str] = []
        self._content: list[str] = []
        self._problems: list[str] = []
        self._events: list[StreamEvent] = []
        self._finished = False

    # -- public ------------------------------------------------------------------------------------------

    def feed(self, text: str) -> list[StreamEvent]:
        """Consume a text delta; return the events it completes."""
        if self._finished:
            raise RuntimeError("ToolCallStreamParser.feed() after finish()")
        self._buf += text
        self._drain(final=False)
        return self._take_events()

    def finish(self) -> tuple[list[StreamEvent], ParsedOutput]:
        """End of output: flush held-back text, close or degrade anything open, return the final result."""
        if not self._finished:
            self._drain(final=True)
            self._finished = True
            if self._state == _SECTION:
                self._problem("tool-call section not closed with <|tool_calls_section_end|>")
            elif self._state == _ID:
                self._degrade_header("output ended inside a tool-call header")
            elif self._state == _ARGS:
                self._close_call(complete=False, why="output ended inside tool-call arguments")
            elif self._state == _DEAD_CALL:
                self._problem("tool-call section not closed with <|tool_calls_section_end|>")
            self._state = _DONE
        events = self._take_events()
        result = ParsedOutput(content="".join(self._content),
                              tool_calls=[copy.copy(c) for c in self._calls],
                              malformed=bool(self._problems), problems=list(self._problems))
        return events, result

    # -- internals ---------------------------------------------------------------------------------------

    def _problem(self, text: str) -> None:
        self._problems.append(text)

    def _emit_content(self, text: str) -> None:
        if text:
            self._content.append(text)
            self._events.append(ContentDelta(text))

    def _emit_args(self, text: str) -> None:
        if text:
            idx = len(self._calls) - 1
            self._args[idx] += text
            self._events.append(ToolCallArgsDelta(idx, text))

    def _take_events(self) -> list[StreamEvent]:
        # Coalesce neighbouring deltas of the same kind: fewer, larger events; same concatenations.
        out: list[StreamEvent] = []
        for e in self._events:
            last = out[-1] if out else None
            if isinstance(e, ContentDelta) and isinstance(last, ContentDelta):
                out[-1] = ContentDelta(last.text + e.text)
            elif isinstance(e, ToolCallArgsDelta) and isinstance(last, ToolCallArgsDelta) and last.index == e.index:
                out[-1] = ToolCallArgsDelta(e.index, last.text + e.text)
            else:
                out.append(e)
        self._events = []
        return out

    def _drain(self, final: bool) -> None:
        while self._buf:
            m = _MARKER_RE.search(self._buf)
            if m is None:
                keep = 0
                if not final:  # hold back the longest tail that could still become a marker
                    for k in range(min(len(self._buf), _LONGEST_MARKER - 1), 0, -1):
                        if self._buf[-k:] in _MARKER_PREFIXES:
                            keep = k
                            break
                text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                self._on_text(text)
                return
            self._on_text(self._buf[:m.start()])
            self._buf = self._buf[m.end():]
            self._on_marker(m.group())

    def _on_text(self, text: str) -> None:
        if not text:
            return
        st = self._state
        if st == _TEXT or st == _DEAD_CALL:
            self._emit_content(text)
        elif st == _SECTION:
            if not self._junk:  # whitespace between calls is allowed and dropped
                stripped = text.lstrip()
                if not stripped:
                    return
                text = stripped
                self._junk = True
                self._problem("text inside the tool-call section outside any call (kept as content)")
            self._emit_content(text)
        elif st == _ID:
            self._id_buf += text
            if len(self._id_buf) > _MAX_ID_LEN:
                self._problem(f"tool-call header longer than {_MAX_ID_LEN} characters (kept as content)")
                self._emit_content(self._id_buf)
                self._id_buf = ""
                self._state = _DEAD_CALL
        elif st == _ARGS:
            if not self._args_started:  # arguments are the stripped span: drop leading whitespace
                text = text.lstrip()
                if not text:
                    return
                self._args_started = True
            text = self._ws_hold + text
            body = text.rstrip()
            self._ws_hold = text[len(body):]
            self._emit_args(body)
        # _DONE: text after the end of the turn is ignored

    def _on_marker(self, mk: str) -> None:
        st = self._state
        if st == _DONE:
            return
        if mk in _TURN_END:
            if st == _ID:
                self._degrade_header("tool-call header cut off by the end of the turn")
            elif st == _ARGS:
                self._close_call(complete=False, why="tool call cut off by the end of the turn")
            elif st in (_SECTION, _DEAD_CALL):
                self._problem("tool-call section not closed with <|tool_calls_section_end|>")
            self._state = _DONE
            return
        if st == _TEXT:
            if mk == SECTION_BEGIN:
                self._enter_section()
            else:
                self._stray(mk, "outside a tool-call section")
        elif st == _SECTION:
            self._section_marker(mk)
        elif st == _ID:
            if mk == ARG_BEGIN:
                self._open_call()
            else:
                self._degrade_header(f"tool-call header interrupted by {mk}")
                self._section_marker(mk)
        elif st == _ARGS:
            if mk == CALL_END:
                self._close_call(complete=True)
                self._enter_section()
            elif mk in (CALL_BEGIN, SECTION_END):
                self._close_call(complete=False, why=f"tool call not closed with {CALL_END} before {mk}")
                self._enter_section()
                self._section_marker(mk)
            else:  # a section/argument marker inside arguments: keep it as argument text
                self._problem(f"stray {mk} inside tool-call arguments (kept as text)")
                self._on_text(mk)
        elif st == _DEAD_CALL:
            if mk in (ARG_BEGIN, CALL_END):  # the dead call's own markers (dropped; its text stays)
                if mk == CALL_END:
                    self._enter_section()
            else:
                self._enter_section()
                self._section_marker(mk)

    def _enter_section(self) -> None:
        self._state = _SECTION
        self._junk = False

    def _section_marker(self, mk: str) -> None:
        if mk == CALL_BEGIN:
            self._state, self._id_buf = _ID, ""
        elif mk == SECTION_END:
            self._state = _TEXT
        else:
            self._stray(mk, "inside the tool-call section outside any call")

    def _stray(self, mk: str, where: str) -> None:
        self._problem(f"stray {mk} {where} (dropped)")
        if self._state == _SECTION:
            self._junk = True

    def _degrade_header(self, why: str) -> None:
        self._problem(f"{why}; its text kept as content")
        self._emit_content(self._id_buf)
        self._id_buf = ""
        self._enter_section()

    def _open_call(self) -> None:
        call_id = self._id_buf.strip()
        name = _call_name(call_id, self._tool_names)
        if not name:
            # Nothing callable: keep the call's text (not its markers) as content up to its <|tool_call_end|>.
            self._problem("tool call without a function name (its text kept as content)")
            self._emit_content(self._id_buf)
            self._id_buf = ""
            self._state = _DEAD_CALL
            return
        index = len(self._calls)
        self._calls.append(ToolCall(index=index, id=call_id, name=name, arguments="", valid_json=False,
                                    complete=False))
        self._args.append("")
        self._events.append(ToolCallStart(index, call_id, name))
        self._id_buf, self._args_started, self._ws_hold = "", False, ""
        self._state = _ARGS

    def _close_call(self, complete: bool, why: str = "") -> None:
        call = self._calls[-1]
        call.arguments = self._args[-1]
        call.complete = complete
        self._ws_hold = ""  # trailing whitespace is not part of the arguments
        try:
            call.valid_json = isinstance(json.loads(call.arguments), dict)
        except ValueError:
            call.valid_json = False
        if not complete:
            self._problem(f"tool call {call.index} ({call.name}): {why}")
        if not call.valid_json:
            self._problem(f"tool call {call.index} ({call.name}): arguments are not a JSON object "
                          "(raw text kept)")
        self._events.append(ToolCallEnd(call.index))
        self._state = _SECTION


def parse_output(text: str, tool_names: Optional[Sequence[str]] = None) -> ParsedOutput:
    """Parse a whole model output (special tokens as their strings) into content and tool calls.

    Same result as feeding ``text`` to a :class:`ToolCallStreamParser` and finishing.  Never raises on
    malformed output; see :class:`ParsedOutput` for how it degrades.
    """
    p = ToolCallStreamParser(tool_names)
    p.feed(text)
    return p.finish()[1]
