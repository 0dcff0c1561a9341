"""``kimi-local chat``: a terminal chat with Kimi-K2 (or the built-in tiny demo model).

Three layers, so the conversation logic can be tested without a terminal:

- :class:`ChatSession` -- the conversation: messages, system prompt, sampling settings, prompt
  building (the model directory's ``chat_template.jinja`` when it ships one), streaming a reply
  through the engine and the tool-call parser, the slash commands, save/load as JSON, statistics.
  No terminal I/O.
- :class:`ChatUI` -- everything on the screen (rich): banner, load progress bar, streamed reply,
  tool calls, the dim statistics line, command output, and reading (multi-line) input with history.
- :func:`run` -- glue: flags -> engine -> loop; Ctrl-C during a reply sets the engine's cancel Event
  (the program keeps running); Ctrl-D at the prompt exits.

Input conventions (no extra dependency: GNU readline gives line editing and history):
a line ending in ``\\`` continues on the next line; a line that is just ``\"\"\"`` starts a block
that runs to the next ``\"\"\"`` line (for pasting).  A message that starts with ``/`` is sent as
text when written ``//...``.  History is kept in ``$KIMI_LOCAL_CHAT_HISTORY`` (default
``<cache>/chat_history``; ``KIMI_LOCAL_CACHE`` moves the cache).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kimi_local.errors import UserError

SAVE_FORMAT = "kimi-local-chat"
SAVE_VERSION = 1
TINY_DEFAULT_MAX_TOKENS = 200   # the random demo model never says <|im_end|> on purpose
REAL_MODEL_HINT = "kimi-local chat --model /path/to/Kimi-K2-Instruct"

HELP_TEXT = """\
Commands
  /help                 this help
  /reset                start a new conversation (system prompt and settings are kept)
  /system [TEXT]        show or set the system prompt  (/system --default: Kimi's default prompt)
  /temp [X]             show or set the sampling temperature (0 = greedy)
  /max-tokens [N|none]  show or set the reply length limit
  /save FILE            save the conversation as JSON
  /load FILE            load a conversation saved by /save (or an OpenAI-style messages list)
  /stats                speed, cached tokens, context use and engine counters
  /exit                 quit (also /quit or Ctrl-D)

Input
  Enter sends.  End a line with \\ to continue on the next line; a line with just \"\"\" starts a
  block for pasting that ends at the next \"\"\" line.  Up/Down walk the input history.
  Start a message with // to send text that begins with /.
  Ctrl-C stops a reply that is being generated; Ctrl-D on an empty prompt exits."""


# ---------------------------------------------------------------------------------------------- logic


@dataclass
class Reply:
    """One assistant reply as produced by :meth:`ChatSession.send`."""

    content: str
    tool_calls: list                      # chat_format.ToolCall
    finish_reason: str                    # "stop" | "length" | "cancelled"
    timings: Any = None                   # engine.Timings
    problems: list = field(default_factory=list)   # malformed tool-call output, one line each
    kept: bool = True                     # stored in the conversation (False: cancelled before any output)
    context_full: bool = False            # "length" because the context window ran out


@dataclass
class CommandResult:
    """What a slash command did; the UI decides how it looks.

    kind: "ok" (message), "error" (message), "help" (message), "stats" (data: dict), "exit".
    """

    kind: str
    message: str = ""
    data: Any = None


class ChatSession:
    """A conversation with one engine.  Thread-compatible, not thread-safe (one caller at a time).

    Args:
        engine: a ``kimi_local.engine.Engine`` (or anything with ``tokenizer``, ``generate``, ``stats``, ``ctx_len``).
        template: chat template source (the checkpoint's ``chat_template.jinja``); None = built-in renderer.
        system: system prompt; None = the template's default ("You are Kimi, ...").
        params: a ``SamplingParams`` used as the base for every reply.
        tools: OpenAI-style tool declarations rendered into the prompt (optional).
    """

    def __init__(self, engine, *, template: Optional[str] = None, system: Optional[str] = None,
                 params=None, tools: Optional[list] = None, model_dir: Optional[str] = None):
        from kimi_local.sampling import SamplingParams

        self.engine = engine
        self.template = template
        self.system = system
        self.params = params if params is not None else SamplingParams()
        self.tools = tools
        self.model_dir = model_dir
        self.messages: list[dict] = []
        self.last: Optional[Reply] = None
        self.turns = 0

    # -- prompt ------------------------------------------------------------------------------------------

    def full_messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system is not None else []
        return head + [dict(m) for m in self.messages]

    def prompt_ids(self) -> list[int]:
        from kimi_local.chat_format import encode_conversation, normalize_messages

        msgs, _ = normalize_messages(self.full_messages(), self.tools)
        return encode_conversation(self.engine.tokenizer, msgs, tools=self.tools, template=self.template,
                                   add_generation_prompt=True)

    # -- a turn ------------------------------------------------------------------------------------------

    def send(self, text: str, cancel: Optional[threading.Event] = None,
             on_event: Optional[Callable[[Any], None]] = None) -> Reply:
        """Add a user message, stream the reply, store it, return it.

        ``on_event`` receives ``chat_format`` stream events (ContentDelta, ToolCallStart,
        ToolCallArgsDelta, ToolCallEnd) as they become certain.  On an error before or during generation
        (e.g. ``ContextOverflowError``) the user message is taken back and the error propagates.
        A reply cancelled before any output is not kept (the user message is taken back too).
        """
        from kimi_local.chat_format import ToolCallStreamParser

        self.messages.append({"role": "user", "content": text})
        n_before = len(self.messages) - 1
        emit = on_event or (lambda ev: None)
        parser = ToolCallStreamParser([t["function"]["name"] for t in self.tools] if self.tools else None)
        raw: list[str] = []
        finish, timings = "stop", None
        try:
            ids = self.prompt_ids()
            gen = self.engine.generate(ids, self.params, cancel)
            try:
                for chunk in gen:
                    if chunk.text:
                        raw.append(chunk.text)
                        for ev in parser.feed(chunk.text):
                            emit(ev)
                    if chunk.finish_reason is not None:
                        finish, timings = chunk.finish_reason, chunk.timings
            finally:
                close = getattr(gen, "close", None)
                if close is not None:
                    close()
        except BaseException:
            del self.messages[n_before:]
            raise
        events, parsed = parser.finish()
        for ev in events:
            emit(ev)
        context_full = False
        if finish == "length" and timings is not None:
            ctx = getattr(self.engine, "ctx_len", None)
            context_full = ctx is not None and timings.prompt_tokens + timings.generated_tokens >= ctx
        reply = Reply(content=parsed.content, tool_calls=parsed.tool_calls, finish_reason=finish, timings=timings,
                      problems=list(parsed.problems), context_full=context_full)
        calls = [c for c in parsed.tool_calls if c.complete]
        if finish == "cancelled" and not "".join(raw):
            del self.messages[n_before:]
            reply.kept = False
        else:
            msg: dict = {"role": "assistant", "content": parsed.content}
            if calls:
                msg["tool_calls"] = [c.to_openai() for c in calls]
            self.messages.append(msg)
            self.turns += 1
        self.last = reply
        return reply

    # -- commands ----------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation.  The engine's KV cache is kept: the system prompt is reused exactly."""
        self.messages = []
        self.last = None
        self.turns = 0

    def set_system(self, text: Optional[str]) -> None:
        self.system = text

    def set_temperature(self, value: float) -> None:
        import dataclasses
        new = dataclasses.replace(self.params, temperature=value)
        new.validate()
        self.params = new

    def set_max_tokens(self, value: Optional[int]) -> None:
        import dataclasses
        new = dataclasses.replace(self.params, max_tokens=value)
        new.validate()
        self.params = new

    def to_json(self) -> dict:
        p = self.params
        return {"format": SAVE_FORMAT, "version": SAVE_VERSION, "system": self.system,
                "messages": [dict(m) for m in self.messages],
                "settings": {"temperature": p.temperature, "max_tokens": p.max_tokens, "seed": p.seed},
                "model": self.model_dir}

    def save(self, path: str) -> int:
        """Write the conversation as JSON; return the number of messages."""
        path = os.path.expanduser(path)
        data = self.to_json()
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=2)
                f.write("\n")
            os.replace(tmp, path)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise UserError(f"cannot save to {path}: {e.strerror or e}") from None
        return len(data["messages"])

    def load(self, path: str) -> int:
        """Replace the conversation (and system prompt) with a saved one; return the number of messages.

        Accepts this command's own format, an OpenAI request body (``{"messages": [...]}``) or a bare list
        of messages.  A leading system message becomes the system prompt.  Nothing changes on error.
        """
        from kimi_local.chat_format import normalize_messages

        path = os.path.expanduser(path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise UserError(f"{path} is not valid JSON: {e}") from None
        has_system = False
        if isinstance(data, dict):
            if "messages" not in data:
                raise UserError(f"{path}: expected a saved chat (an object with \"messages\") or a list of messages")
            messages = data["messages"]
            system = data.get("system")
            has_system = "system" in data
        else:
            messages, system = data, None
        if not isinstance(messages, list):
            raise UserError(f"{path}: \"messages\" must be a list")
        if system is not None and not isinstance(system, str):
            raise UserError(f"{path}: \"system\" must be a string or null")
        messages = [dict(m) if isinstance(m, dict) else m for m in messages]
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system" \
                and isinstance(messages[0].get("content"), str):
            system, has_system = messages[0]["content"], True
            messages = messages[1:]
        head = [{"role": "system", "content": system}] if system is not None else []
        normalize_messages(head + messages, self.tools)  # validates; raises ChatFormatError (a UserError)
        self.messages = messages
        if has_system or system is not None:
            self.system = system
        self.last = None
        self.turns = sum(1 for m in messages if isinstance(m, dict) and m.get("role") == "assistant")
        return len(messages)

    def stats(self) -> dict:
        """Everything /stats shows, as plain data."""
        out: dict = {"settings": {"temperature": self.params.temperature, "max_tokens": self.params.max_tokens,
                                  "seed": self.params.seed},
                     "conversation": {"messages": len(self.messages), "turns": self.turns}}
        t = self.last.timings if self.last is not None else None
        if t is not None:
            out["last_reply"] = {"prompt_tokens": t.prompt_tokens, "cached_tokens": t.cached_tokens,
                                 "generated_tokens": t.generated_tokens,
                                 "prefill_tok_s": round(t.prefill_tok_s, 2), "decode_tok_s": round(t.decode_tok_s, 2)}
        try:
            es = dict(self.engine.stats())
        except Exception:  # stats are informational: never let them break the chat
            es = {}
        es.pop("last", None)
        totals: dict = {}
        for k in ("requests", "prompt_tokens", "cached_tokens", "generated_tokens"):
            if k in es:
                totals[k] = es.pop(k)
        ps, ds = es.pop("prefill_seconds", None), es.pop("decode_seconds", None)
        if ps and "prompt_tokens" in totals:
            totals["prefill_tok_s"] = round((totals["prompt_tokens"] - totals.get("cached_tokens", 0)) / ps, 2)
        if ds and "generated_tokens" in totals:
            totals["decode_tok_s"] = round(totals["generated_tokens"] / ds, 2)
        if totals:
            out["totals"] = totals
        ctx = es.pop("ctx_len", getattr(self.engine, "ctx_len", None))
        fill = es.pop("cache_fill", None)
        if ctx is not None:
            out["context"] = {"ctx_len": ctx, "cached_tokens": fill, "cache_bytes": es.pop("cache_bytes", None)}
        ec = es.pop("experts", None)  # the offload runtime's figures, when the engine reports them
        if isinstance(ec, dict):
            ec = {k: v for k, v in ec.items() if k != "layers"}  # per-layer detail is too long for a screen
        else:
            ec = expert_cache_stats(self.engine)
        if ec:
            out["expert_cache"] = ec
        if es:  # anything else the engine reports (expert-cache figures once offloading lands)
            out["engine"] = es
        return out

    def execute(self, line: str) -> CommandResult:
        """Run one slash command line (``/name args``)."""
        name, _, arg = line.strip().partition(" ")
        name, arg = name.lower(), arg.strip()
        try:
            if name in ("/help", "/h", "/?"):
                return CommandResult("help", HELP_TEXT)
            if name in ("/exit", "/quit", "/q"):
                return CommandResult("exit")
            if name == "/reset":
                self.reset()
                return CommandResult("ok", "conversation cleared")
            if name == "/system":
                if not arg:
                    shown = self.system if self.system is not None else _default_system() + "  (default)"
                    return CommandResult("ok", f"system prompt: {shown}")
                if arg == "--default":
                    self.set_system(None)
                    return CommandResult("ok", "system prompt: Kimi's default")
                self.set_system(arg)
                return CommandResult("ok", "system prompt set (applies from the next reply)")
            if name in ("/temp", "/temperature"):
                if not arg:
                    return CommandResult("ok", f"temperature: {self.params.temperature:g}")
                try:
                    value = float(arg)
                except ValueError:
                    return CommandResult("error", f"/temp: expected a number, got {arg!r}")
                self.set_temperature(value)
                return CommandResult("ok", f"temperature: {value:g}" + ("  (greedy)" if value == 0 else ""))
            if name in ("/max-tokens", "/max_tokens", "/max"):
                if not arg:
                    return CommandResult("ok", f"max tokens: {self.params.max_tokens or 'none (until the model stops)'}")
                if arg.lower() in ("none", "off", "0"):
                    self.set_max_tokens(None)
                    return CommandResult("ok", "max tokens: none (until the model stops or the context is full)")
                try:
                    value = int(arg)
                except ValueError:
                    return CommandResult("error", f"/max-tokens: expected a positive integer or 'none', got {arg!r}")
                self.set_max_tokens(value)
                return CommandResult("ok", f"max tokens: {value}")
            if name == "/save":
                if not arg:
                    return CommandResult("error", "/save: give a file name, e.g. /save chat.json")
                n = self.save(arg)
                return CommandResult("ok", f"saved {n} messages to {arg}")
            if name == "/load":
                if not arg:
                    return CommandResult("error", "/load: give a file name, e.g. /load chat.json")
                n = self.load(arg)
                return CommandResult("ok", f"loaded {n} messages from {arg}")
            if name == "/stats":
                return CommandResult("stats", data=self.stats())
        except UserError as e:
            return CommandResult("error", f"{name}: {e}")
        return CommandResult("error", f"unknown command {name} (try /help; start a message with // to send a literal /)")


def _expert_store(engine):
    return getattr(getattr(engine, "model", None), "experts", None)


def expert_cache_stats(engine) -> Optional[dict]:
    """The offload expert store's figures (tiers and totals; the per-layer breakdown is left out), if any."""
    fn = getattr(_expert_store(engine), "stats", None)
    if not callable(fn):
        return None
    try:
        st = fn()
    except Exception:  # informational only
        return None
    if not isinstance(st, dict):
        return None
    return {k: v for k, v in st.items() if k != "layers"}


def _default_system() -> str:
    from kimi_local.chat_format import DEFAULT_SYSTEM_PROMPT
    return DEFAULT_SYSTEM_PROMPT


def classify_input(line: str) -> tuple[str, str]:
    """("command", line) for slash commands, ("message", text) otherwise, ("empty", "") for blank input."""
    if not line.strip():
        return "empty", ""
    s = line.lstrip()
    if s.startswith("//"):
        return "message", s[1:]
    if s.startswith("/"):
        return "command", s
    return "message", line


# ---------------------------------------------------------------------------------------------- screen


def sanitize(text: str) -> str:
    """Make model output safe to print: control characters (but newline and tab) become visible escapes."""
    if text.isprintable() or all(c.isprintable() or c in "\n\t" for c in text):
        return text
    out = []
    for c in text:
        if c in "\n\t" or c.isprintable() or ord(c) > 0x9F:
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}")
    return "".join(out)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_stats_line(reply: Reply) -> str:
    """The one dim line after each reply."""
    t = reply.timings
    parts = []
    if t is not None:
        parts.append(f"{t.generated_tokens} tokens")
        parts.append(f"prompt {t.prompt_tokens}" + (f" ({t.cached_tokens} cached)" if t.cached_tokens else ""))
        parts.append(f"prefill {t.prefill_tok_s:.1f} tok/s")
        parts.append(f"decode {t.decode_tok_s:.1f} tok/s")
    if reply.finish_reason == "cancelled":
        parts.append("stopped" + ("" if reply.kept else ", message not kept"))
    elif reply.context_full:
        parts.append("context window full (/reset to start over)")
    elif reply.finish_reason == "length":
        parts.append("max tokens reached")
    return " · ".join(parts)


class ChatUI:
    """All terminal output and input for the chat (rich for output, readline for input)."""

    USER_PROMPT = "you› "
    CONT_PROMPT = "...  "

    def __init__(self, console=None, history_file: Optional[str] = None):
        from rich.console import Console

        self.console = console or Console(highlight=False)
        self.err_console = console or Console(stderr=True, highlight=False)
        self.history_file = history_file
        self._readline = None
        self._at_line_start = True

    # -- input -------------------------------------------------------------------------------------------

    def setup_input(self) -> None:
        if not sys.stdin.isatty():
            return
        try:
            import readline
        except ImportError:  # Windows without pyreadline: plain input(), no history
            return
        self._readline = readline
        readline.set_history_length(2000)
        if self.history_file:
            try:
                readline.read_history_file(self.history_file)
            except OSError:
                pass

    def save_history(self) -> None:
        if self._readline is not None and self.history_file:
            try:
                os.makedirs(os.path.dirname(os.path.abspath(self.history_file)), exist_ok=True)
                self._readline.write_history_file(self.history_file)
            except OSError:
                pass

    def _prompt(self, text: str, style: str) -> str:
        if not (self.console.is_terminal and self.console.color_system):
            return text
        esc = {"user": "\x1b[1;32m", "cont": "\x1b[2m"}[style]
        if self._readline is not None:  # tell readline the escapes take no columns
            return f"\001{esc}\002{text}\001\x1b[0m\002"
        return f"{esc}{text}\x1b[0m"

    def read_input(self) -> Optional[str]:
        """One user entry (possibly multi-line); None on Ctrl-D.  Ctrl-C raises KeyboardInterrupt."""
        try:
            line = input(self._prompt(self.USER_PROMPT, "user"))
        except EOFError:
            return None
        if line.strip() == '"""':
            lines = []
            while True:
                try:
                    nxt = input(self._prompt(self.CONT_PROMPT, "cont"))
                except EOFError:
                    break
                if nxt.strip() == '"""':
                    break
                lines.append(nxt)
            return "\n".join(lines)
        lines = []
        while line.endswith("\\"):
            lines.append(line[:-1])
            try:
                line = input(self._prompt(self.CONT_PROMPT, "cont"))
            except EOFError:
                line = ""
                break
        lines.append(line)
        return "\n".join(lines)

    # -- output ------------------------------------------------------------------------------------------

    def _write(self, text: str, style: Optional[str] = None) -> None:
        from rich.text import Text

        if not text:
            return
        self.console.print(Text(text, style=style or ""), end="", soft_wrap=True)
        self._at_line_start = text.endswith("\n")
        try:
            self.console.file.flush()
        except Exception:
            pass

    def _newline_if_needed(self) -> None:
        if not self._at_line_start:
            self._write("\n")

    def banner(self, *, tiny: bool, model_dir: str, engine=None, args=None) -> None:
        from rich.panel import Panel
        from rich.text import Text

        t = Text()
        if tiny:
            t.append("kimi-local chat · built-in tiny demo model\n", style="bold")
            t.append("This is a random-weight model in the real Kimi-K2 format: its outputs are not meaningful.\n",
                     style="yellow")
            t.append("To chat with Kimi-K2, download Kimi-K2-Instruct and run:\n")
            t.append(f"  {REAL_MODEL_HINT}\n", style="bold cyan")
        else:
            t.append(f"kimi-local chat · {model_dir}\n", style="bold")
        if engine is not None:
            bits = [f"context {getattr(engine, 'ctx_len', '?')} tokens"]
            if args is not None:
                bits += [f"dtype {args.dtype}", f"experts: {args.expert_backend}", f"device {args.device}"]
            t.append(" · ".join(bits) + "\n", style="dim")
        t.append("/help for commands · Enter sends, end a line with \\ for more · Ctrl-C stops a reply · Ctrl-D exits",
                 style="dim")
        self.console.print(Panel(t, border_style="cyan", expand=False))

    def load_progress(self, label: str):
        """A context manager yielding ``progress(done_bytes, total_bytes)`` that drives a rich progress bar."""
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        ui = self

        class _Bar:
            def __enter__(self):
                self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(),
                                         TransferSpeedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                         console=ui.console, transient=False)
                self.task = self.progress.add_task(label, total=None)
                self.progress.start()
                return self.update

            def update(self, done: int, total: int) -> None:
                self.progress.update(self.task, completed=done, total=total or None)

            def __exit__(self, *exc):
                self.progress.stop()
                return False

        return _Bar()

    def status(self, text: str):
        return self.console.status(text)

    def start_reply(self) -> None:
        self._write("kimi› ", "bold cyan")
        self._at_line_start = False

    def show_event(self, ev) -> None:
        from kimi_local.chat_format import ContentDelta, ToolCallArgsDelta, ToolCallEnd, ToolCallStart

        if isinstance(ev, ContentDelta):
            self._write(sanitize(ev.text))
        elif isinstance(ev, ToolCallStart):
            self._newline_if_needed()
            self._write("⚙ tool call ", "bold magenta")
            self._write(sanitize(ev.name), "bold")
            self._write(f"  [{sanitize(ev.id)}]\n", "dim")
            self._write("  ")
        elif isinstance(ev, ToolCallArgsDelta):
            self._write(sanitize(ev.text).replace("\n", "\n  "), "yellow")
        elif isinstance(ev, ToolCallEnd):
            self._write("\n")

    def end_reply(self, reply: Reply) -> None:
        self._newline_if_needed()
        for c in reply.tool_calls:
            if not c.valid_json:
                self._write(f"  (tool call {c.index} {sanitize(c.name)}: arguments are not a JSON object)\n", "dim yellow")
        if reply.problems:
            more = f" (+{len(reply.problems) - 1} more)" if len(reply.problems) > 1 else ""
            self._write(f"note: malformed tool-call output kept as text: {reply.problems[0]}{more}\n", "dim yellow")
        self._write(format_stats_line(reply) + "\n", "dim")

    def abort_reply(self) -> None:
        self._newline_if_needed()

    def show_result(self, res: CommandResult) -> None:
        from rich.text import Text

        if res.kind == "error":
            self.error(res.message)
        elif res.kind == "help":
            self.console.print(Text(res.message))
        elif res.kind == "stats":
            self.show_stats(res.data)
        elif res.message:
            self.console.print(Text(res.message, style="green"))

    def show_stats(self, data: dict) -> None:
        from rich.table import Table

        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()

        def add(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for k, v in value.items():
                    add(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                if isinstance(value, float):
                    value = f"{value:,.2f}"
                elif isinstance(value, int) and not isinstance(value, bool):
                    value = f"{value:,}" + (f"  ({_human_bytes(value)})" if prefix.endswith("bytes") else "")
                table.add_row(prefix, sanitize(str(value)))

        for section, value in data.items():
            add(section, value)
        self.console.print(table)

    def info(self, text: str) -> None:
        from rich.text import Text
        self.console.print(Text(text, style="dim"))

    def error(self, text: str) -> None:
        from rich.text import Text
        self._newline_if_needed()
        self.console.file.flush()
        self.err_console.print(Text(f"error: {text}", style="bold red"), soft_wrap=True)


# ---------------------------------------------------------------------------------------------- command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from kimi_local import cli_common

    try:
        cli_common.add_model_args(parser)
    except ImportError:
        pass  # the offload flags are not available in this build; the core model flags were added
    g = parser.add_argument_group("chat")
    g.add_argument("--system", metavar="TEXT", default=None,
                   help="system prompt (default: Kimi's own, \"You are Kimi, an AI assistant created by Moonshot AI.\")")
    g.add_argument("--temperature", type=float, default=0.6, help="sampling temperature; 0 = greedy (default 0.6)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help=f"reply length limit (default: until the model stops; {TINY_DEFAULT_MAX_TOKENS} for the tiny demo)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same replies)")
    g.add_argument("--history-file", metavar="FILE", default=None,
                   help="input history file (default: $KIMI_LOCAL_CHAT_HISTORY or <cache>/chat_history)")


def _history_path(args) -> str:
    if getattr(args, "history_file", None):
        return args.history_file
    env = os.environ.get("KIMI_LOCAL_CHAT_HISTORY")
    if env:
        return env
    from kimi_local.tiny import cache_root
    return os.path.join(cache_root(), "chat_history")


def _build_engine(args, model_dir: str, progress):
    """The engine from the shared model flags (cli_common), tolerating a build without the offload module."""
    import importlib.util

    from kimi_local import cli_common

    args.model = model_dir
    try:
        have_offload = importlib.util.find_spec("kimi_local.offload.options") is not None
    except ImportError:
        have_offload = False
    if have_offload:
        return cli_common.engine_from_args(args, progress)
    from kimi_local.checkpoint import load_model
    from kimi_local.engine import Engine
    from kimi_local.tokenizer import KimiTokenizer

    cli_common.apply_threads(getattr(args, "threads", None))
    tok = KimiTokenizer.from_model_dir(model_dir)
    model = load_model(model_dir, device=getattr(args, "device", "cpu"), dtype=cli_common.dtype_of(args),
                       expert_backend=args.expert_backend, progress=progress)
    engine = Engine(model, tok, ctx=getattr(args, "ctx", None))
    engine.model_dir = model_dir
    return engine


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return msg[0] if msg else type(e).__name__


def run(args: argparse.Namespace) -> int:
    from kimi_local.sampling import SamplingParams

    ui = ChatUI(history_file=_history_path(args))
    debug = bool(os.environ.get("KIMI_LOCAL_DEBUG"))
    tiny = args.model is None
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                max_tokens=args.max_tokens if args.max_tokens is not None
                                else (TINY_DEFAULT_MAX_TOKENS if tiny else None))
        params.validate()
        if tiny:
            from kimi_local.tiny import ensure_tiny
            with ui.status("Preparing the built-in tiny demo model (first use builds it)..."):
                model_dir = ensure_tiny()
        else:
            model_dir = os.path.abspath(os.path.expanduser(args.model))
            if not os.path.isdir(model_dir):
                raise UserError(f"--model {args.model}: no such directory")
            if not os.path.isfile(os.path.join(model_dir, "config.json")):
                raise UserError(f"--model {args.model}: no config.json there (expected a Kimi-K2 download, "
                                "e.g. a folder with config.json, *.safetensors and tiktoken.model)")
        with ui.load_progress("Loading model") as progress:
            engine = _build_engine(args, model_dir, progress)
        template = None
        tpath = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(tpath):
            with open(tpath, encoding="utf-8") as f:
                template = f.read()
    except UserError as e:
        ui.error(_one_line(e))
        return 2
    except KeyboardInterrupt:
        ui.error("interrupted while loading")
        return 130
    except Exception as e:  # a bad model directory must not end in a traceback
        if debug:
            raise
        ui.error(f"could not load the model from {args.model or 'the tiny demo'}: {type(e).__name__}: {_one_line(e)}"
                 " (KIMI_LOCAL_DEBUG=1 shows the traceback)")
        return 2

    session = ChatSession(engine, template=template, system=args.system, params=params, model_dir=model_dir)
    ui.banner(tiny=tiny, model_dir=model_dir, engine=engine, args=args)
    ui.setup_input()
    try:
        return _loop(session, ui, debug)
    finally:
        ui.save_history()
        close = getattr(_expert_store(engine), "close", None)  # offload runtime: stop its threads, flush traces
        if callable(close):
            try:
                close()
            except Exception:
                pass


def _loop(session: ChatSession, ui: ChatUI, debug: bool) -> int:
    while True:
        try:
            line = ui.read_input()
        except KeyboardInterrupt:
            ui._at_line_start = False
            ui.info("\n(Ctrl-C stops a reply; Ctrl-D or /exit quits)")
            continue
        if line is None:
            ui.console.print()
            return 0
        kind, text = classify_input(line)
        if kind == "empty":
            continue
        if kind == "command":
            res = session.execute(text)
            if res.kind == "exit":
                return 0
            ui.show_result(res)
            continue
        _reply(session, ui, text, debug)


def _reply(session: ChatSession, ui: ChatUI, text: str, debug: bool) -> None:
    cancel = threading.Event()
    old = None
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        old = signal.signal(signal.SIGINT, lambda signum, frame: cancel.set())
    ui.start_reply()
    try:
        reply = session.send(text, cancel=cancel, on_event=ui.show_event)
    except UserError as e:
        ui.abort_reply()
        ui.error(_one_line(e))
        return
    except Exception as e:
        if debug:
            raise
        ui.abort_reply()
        ui.error(f"generation failed: {type(e).__name__}: {_one_line(e)}")
        return
    finally:
        if in_main:
            signal.signal(signal.SIGINT, old)
    ui.end_reply(reply)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-local chat", description="terminal chat")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
