"""``kimi-local chat``: the conversation logic on a real engine (tiny model), the screen layer on a recorded
console, and the whole program driven through a pseudo-terminal (typing, commands, Ctrl-C mid-reply, Ctrl-D)."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from kimi_local.chat import (ChatSession, ChatUI, Reply, classify_input, format_stats_line,
                             sanitize)
from kimi_local.chat_format import (ARG_BEGIN, CALL_BEGIN, CALL_END, ContentDelta, SECTION_BEGIN, SECTION_END,
                                    ToolCallStart)
from kimi_local.engine import ContextOverflowError, Engine, GenerationChunk, Timings
from kimi_local.sampling import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.from_model_dir(tiny_dir, dtype=torch.float32, expert_backend="torch")


@pytest.fixture(scope="module")
def template(tiny_dir):
    with open(os.path.join(tiny_dir, "chat_template.jinja"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def session(engine, template, tiny_dir):
    return ChatSession(engine, template=template, system="Be brief.", model_dir=tiny_dir,
                       params=SamplingParams(temperature=0, max_tokens=3))


# ---------------------------------------------------------------------------------------------- logic


def test_reply_streams_is_kept_and_next_turn_reuses_the_cache(session):
    events = []
    r1 = session.send("hello there", on_event=events.append)
    assert r1.kept and r1.finish_reason in ("stop", "length")
    assert "".join(e.text for e in events if isinstance(e, ContentDelta)) == r1.content
    assert r1.timings.generated_tokens >= 1 and r1.timings.prompt_tokens > 0
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[0]["content"] == "hello there"
    assert session.messages[1]["content"] == r1.content

    r2 = session.send("and again")
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    assert r2.timings.cached_tokens > 0  # the system prompt and first turn were not prefilled again
    assert "cached" in format_stats_line(r2)


def test_prompt_uses_the_shipped_template_and_system_prompt(session, engine):
    from kimi_local.chat_format import DEFAULT_SYSTEM_PROMPT
    session.messages = [{"role": "user", "content": "hi"}]
    text = engine.tokenizer.decode(session.prompt_ids())
    assert "Be brief." in text and DEFAULT_SYSTEM_PROMPT not in text
    assert text.endswith("<|im_assistant|>assistant<|im_middle|>")
    session.execute("/system --default")
    assert DEFAULT_SYSTEM_PROMPT in engine.tokenizer.decode(session.prompt_ids())


def test_commands(session, tmp_path):
    assert session.execute("/help").kind == "help"
    assert "/save FILE" in session.execute("/help").message
    assert session.execute("/exit").kind == "exit"
    assert session.execute("/quit").kind == "exit"

    assert session.execute("/temp 0.25").kind == "ok" and session.params.temperature == 0.25
    assert "0.25" in session.execute("/temp").message
    for bad in ("/temp abc", "/temp -1", "/temp nan"):
        res = session.execute(bad)
        assert res.kind == "error", bad
    assert session.params.temperature == 0.25  # unchanged by the bad values

    assert session.execute("/max-tokens 7").kind == "ok" and session.params.max_tokens == 7
    assert session.execute("/max-tokens none").kind == "ok" and session.params.max_tokens is None
    assert session.execute("/max-tokens -3").kind == "error" and session.params.max_tokens is None

    assert session.execute("/system You are a pirate.").kind == "ok" and session.system == "You are a pirate."
    assert "pirate" in session.execute("/system").message
    session.execute("/system --default")
    assert session.system is None and "default" in session.execute("/system").message

    session.messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    assert session.execute("/reset").kind == "ok" and session.messages == []

    res = session.execute("/frobnicate")
    assert res.kind == "error" and "/help" in res.message
    assert session.execute("/save").kind == "error" and session.execute("/load").kind == "error"
    res = session.execute(f"/load {tmp_path / 'missing.json'}")
    assert res.kind == "error" and "missing.json" in res.message


def test_classify_input():
    assert classify_input("   ") == ("empty", "")
    assert classify_input("/stats") == ("command", "/stats")
    assert classify_input("  /temp 0") == ("command", "/temp 0")
    assert classify_input("//not a command") == ("message", "/not a command")
    assert classify_input("hello /world") == ("message", "hello /world")


def test_save_load_round_trip(session, engine, template, tmp_path):
    session.send("remember this: ünïcode ✓")
    session.execute("/system Speak softly.")
    path = tmp_path / "chat.json"
    res = session.execute(f"/save {path}")
    assert res.kind == "ok" and "2 messages" in res.message
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["format"] == "kimi-local-chat" and data["system"] == "Speak softly."
    assert data["messages"][0] == {"role": "user", "content": "remember this: ünïcode ✓"}

    other = ChatSession(engine, template=template)
    res = other.execute(f"/load {path}")
    assert res.kind == "ok" and "2 messages" in res.message
    assert other.messages == session.messages and other.system == "Speak softly."
    assert other.prompt_ids() == session.prompt_ids()

    # an OpenAI-style message list with a leading system message loads too
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]))
    assert other.execute(f"/load {plain}").kind == "ok"
    assert other.system == "S" and other.messages == [{"role": "user", "content": "u"}]

    # bad files change nothing
    for name, text in (("bad.json", "{not json"), ("role.json", '[{"role": "wizard", "content": "x"}]'),
                       ("obj.json", '{"foo": 1}')):
        p = tmp_path / name
        p.write_text(text)
        res = other.execute(f"/load {p}")
        assert res.kind == "error", name
        assert other.system == "S" and other.messages == [{"role": "user", "content": "u"}]


def test_stats(session):
    session.send("hi")
    res = session.execute("/stats")
    assert res.kind == "stats"
    s = res.data
    assert s["conversation"]["messages"] == 2
    assert s["last_reply"]["generated_tokens"] >= 1
    assert s["totals"]["requests"] >= 1 and "decode_tok_s" in s["totals"]
    assert s["context"]["ctx_len"] == session.engine.ctx_len and s["context"]["cached_tokens"] > 0
    out = io.StringIO()
    ui = ChatUI(console=_console(out))
    ui.show_result(res)
    assert "totals.decode_tok_s" in out.getvalue() and "context.ctx_len" in out.getvalue()


def test_context_overflow_is_a_clear_error_and_nothing_is_kept(engine, template):
    small = Engine(engine.model, engine.tokenizer, ctx=16)
    s = ChatSession(small, template=template)
    with pytest.raises(ContextOverflowError, match="context window"):
        s.send("this conversation cannot fit in sixteen tokens")
    assert s.messages == []


def test_cancel_before_output_keeps_nothing(session):
    ev = threading.Event()
    ev.set()
    r = session.send("stop right away", cancel=ev)
    assert r.finish_reason == "cancelled" and not r.kept
    assert session.messages == []
    assert "stopped" in format_stats_line(r)


class _ScriptedEngine:
    """Yields fixed text pieces; enough of the engine API for ChatSession."""

    ctx_len = 4096

    def __init__(self, tokenizer, pieces):
        self.tokenizer, self.pieces, self.prompts = tokenizer, pieces, []

    def generate(self, ids, params, cancel=None):
        self.prompts.append(ids)
        t = Timings(len(ids), 0, len(self.pieces), 0.1, 0.2, len(ids) / 0.1, len(self.pieces) / 0.2)
        for i, p in enumerate(self.pieces):
            last = i == len(self.pieces) - 1
            yield GenerationChunk(p, [0], "stop" if last else None, t if last else None)

    def stats(self):
        return {"requests": len(self.prompts),
                "experts": {"total": {"ram_hit_rate": 0.875}, "layers": {1: {"ram_hit_rate": 0.5}}}}


def test_tool_calls_are_parsed_kept_and_shown(engine, template):
    text = (f"Let me check.{SECTION_BEGIN}{CALL_BEGIN}functions.get_weather:0{ARG_BEGIN}"
            '{"city": "Paris",\n "units": {"temp": "C"}}' f"{CALL_END}{SECTION_END}")
    pieces = [text[i:i + 3] for i in range(0, len(text), 3)]  # markers split across chunks
    fake = _ScriptedEngine(engine.tokenizer, pieces)
    s = ChatSession(fake, template=template)
    out = io.StringIO()
    ui = ChatUI(console=_console(out))
    events = []
    ui.start_reply()
    reply = s.send("weather in Paris?", on_event=lambda ev: (events.append(ev), ui.show_event(ev)))
    ui.end_reply(reply)
    assert reply.content == "Let me check."
    assert [(c.name, c.valid_json) for c in reply.tool_calls] == [("get_weather", True)]
    assert any(isinstance(e, ToolCallStart) for e in events)
    msg = s.messages[-1]
    assert msg["role"] == "assistant" and msg["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(msg["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris", "units": {"temp": "C"}}
    screen = out.getvalue()
    assert "kimi› Let me check." in screen
    assert "⚙ tool call get_weather" in screen and "functions.get_weather:0" in screen
    assert '"city": "Paris"' in screen and '"units"' in screen
    assert "<|tool_call" not in screen  # markers never reach the screen
    s.prompt_ids()  # the stored tool call renders back into a prompt
    # engine extras (expert-cache figures) show up in /stats
    assert s.stats()["expert_cache"] == {"total": {"ram_hit_rate": 0.875}}  # per-layer detail left out


def test_malformed_tool_call_degrades_to_text_with_a_note(engine, template):
    fake = _ScriptedEngine(engine.tokenizer, [f"ok {SECTION_BEGIN}{CALL_BEGIN}functions.f:0{ARG_BEGIN}" '{"a": '])
    s = ChatSession(fake, template=template)
    out = io.StringIO()
    ui = ChatUI(console=_console(out))
    reply = s.send("go", on_event=ui.show_event)
    ui.end_reply(reply)
    assert reply.problems and reply.tool_calls and not reply.tool_calls[0].valid_json
    assert "tool_calls" not in s.messages[-1]  # an unfinished call is not stored as a call
    assert "note: malformed tool-call output" in out.getvalue()


def test_sanitize_and_stats_line():
    assert sanitize("a\x1b[2Jb\x07\n\tc") == "a\\x1b[2Jb\\x07\n\tc"
    assert sanitize("ünï ✓ 事") == "ünï ✓ 事"
    t = Timings(40, 30, 12, 0.5, 1.0, 20.0, 12.0)
    line = format_stats_line(Reply("x", [], "length", t))
    assert line == "12 tokens · prompt 40 (30 cached) · prefill 20.0 tok/s · decode 12.0 tok/s · max tokens reached"


def test_multi_line_input_conventions(monkeypatch):
    def feed(lines):
        it = iter(lines)

        def fake_input(prompt=""):
            try:
                return next(it)
            except StopIteration:
                raise EOFError from None
        monkeypatch.setattr("builtins.input", fake_input)

    ui = ChatUI(console=_console(io.StringIO()))
    feed(["first \\", "second \\", "third"])
    assert ui.read_input() == "first \nsecond \nthird"
    feed(['"""', "def f():", "    return 1", "", '"""'])
    assert ui.read_input() == "def f():\n    return 1\n"
    feed(["plain"])
    assert ui.read_input() == "plain"
    feed([])
    assert ui.read_input() is None  # Ctrl-D


def _console(out):
    from rich.console import Console
    return Console(file=out, width=100, force_terminal=False, color_system=None, highlight=False)


# ---------------------------------------------------------------------------------------------- the program


_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Za-z]|\x1b[=>78]|[\x01\x02\r]")


class Terminal:
    """A child process on a pseudo-terminal (stdlib pty; the child gets it as its controlling terminal)."""

    def __init__(self, argv, env, cols=110, rows=40):
        import fcntl
        import pty
        import struct
        import termios

        pid, fd = pty.fork()
        if pid == 0:  # child
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
                os.chdir(REPO)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.raw, self.pos = pid, fd, b"", 0
        self.status = None

    @property
    def screen(self) -> str:
        return _ANSI.sub("", self.raw.decode("utf-8", errors="replace"))

    def _read(self, timeout: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return False
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        if not data:
            raise EOFError
        self.raw += data
        return True

    def expect(self, pattern: str, timeout: float = 30.0) -> re.Match:
        """Wait for ``pattern`` (regex) to appear on the screen after the last match; advance past it."""
        deadline = time.monotonic() + timeout
        while True:
            m = re.compile(pattern).search(self.screen, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; screen tail:\n{self.screen[-2000:]}")
            try:
                self._read(min(left, 0.2))
            except EOFError:
                raise AssertionError(f"program ended while waiting for {pattern!r}; screen tail:\n"
                                     f"{self.screen[-2000:]}") from None

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self._read(0.1)
            except EOFError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                return os.waitstatus_to_exitcode(status)
        raise AssertionError("program did not exit; screen tail:\n" + self.screen[-2000:])

    def close(self) -> None:
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
            except OSError:
                pass
        os.close(self.fd)


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "COLUMNS", "LINES")}
    env.update(TERM="xterm-256color", KIMI_LOCAL_CHAT_HISTORY=str(tmp_path / "history"),
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
    return env


@pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX pseudo-terminal")
def test_chat_in_a_pseudo_terminal(tiny_dir, tmp_path):
    argv = [sys.executable, "-m", "kimi_local.cli", "chat", "--max-tokens", "4", "--system", "Be brief.",
            "--threads", "2"]
    term = Terminal(argv, _env(tmp_path))
    try:
        # banner: the tiny demo says what it is and how to use the real model
        term.expect(r"Loading model .*MB", timeout=60)
        term.expect(r"random-weight model in the real Kimi-K2 format")
        term.expect(r"not meaningful")
        term.expect(re.escape("kimi-local chat --model /path/to/Kimi-K2-Instruct"))
        term.expect(r"you› ", timeout=60)

        # a two-line message (trailing backslash), a streamed reply, then the dim stats line
        term.send("hello there \\\r")
        term.expect(r"\.\.\.  ")
        term.send("second line\r")
        term.expect(r"kimi› ")
        term.expect(r"\d+ tokens · prompt \d+ · prefill [\d.]+ tok/s · decode [\d.]+ tok/s", timeout=60)
        term.expect(r"you› ")

        # commands
        term.send("/stats\r")
        term.expect(r"totals\.requests\s+1")
        term.expect(r"context\.ctx_len\s+2,048")
        term.expect(r"you› ")
        term.send("/help\r")
        term.expect(r"/max-tokens \[N\|none\]")
        term.expect(r"you› ")
        term.send("\x1b[A\r")  # Up: history recalls /help
        term.expect(r"/help")
        term.expect(r"/max-tokens \[N\|none\]")
        term.expect(r"you› ")

        # Ctrl-C at the prompt does not quit (a moment's pause: a signal that lands between readline drawing
        # the prompt and waiting for keys is only noticed at the next key -- CPython's readline, not ours)
        time.sleep(0.5)
        term.send("\x03")
        term.expect(r"Ctrl-D or /exit quits")
        term.expect(r"you› ")

        # Ctrl-C mid-reply stops the reply, not the program
        term.send("/max-tokens none\r")
        term.expect(r"max tokens: none")
        term.expect(r"you› ")
        # (the random model may end a reply by itself first: then try again)
        for attempt in range(5):
            term.send(f"tell me a very long story, take {attempt}\r")
            m = term.expect(r"kimi› ")
            deadline = time.monotonic() + 60
            while len(term.screen[m.end():].strip()) < 8:  # some of the reply is on the screen
                assert time.monotonic() < deadline, term.screen[-2000:]
                term._read(0.1)
            term.send("\x03")
            end = term.expect(r"\d+ tokens · prompt \d+ \(\d+ cached\) .*· stopped|Ctrl-D or /exit quits", timeout=60)
            term.expect(r"you› ")
            if "stopped" in end.group():
                break
        else:
            raise AssertionError("no reply could be interrupted:\n" + term.screen[-3000:])
        term.send("/stats\r")  # alive and answering
        term.expect(r"totals\.requests\s+\d")
        term.expect(r"you› ")

        # Ctrl-D exits cleanly
        term.send("\x04")
        assert term.wait() == 0
        assert "Traceback" not in term.screen
        assert os.path.isfile(tmp_path / "history")
    finally:
        term.close()


def test_bad_model_dir_is_one_clear_line(tmp_path):
    env = _env(tmp_path)
    for target, expect in ((tmp_path / "nope", "no such directory"), (tmp_path, "no config.json")):
        p = subprocess.run([sys.executable, "-m", "kimi_local.cli", "chat", "--model", str(target)],
                           cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        out = p.stdout + p.stderr
        assert p.returncode == 2, out
        assert expect in out and "Traceback" not in out
        assert len([line for line in out.splitlines() if line.strip()]) == 1, out
