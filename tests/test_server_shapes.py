"""Server tests on a scripted fake engine: response shapes for known model output (tool calls included),
the queue, auth, errors, disconnects, /health while loading, and a fuzz pass.

The fake engine yields fixed text (K2 tool-call markers included) with the real tokenizer and chat format,
so these tests check the HTTP layer exactly and fast; ``test_server_api.py`` runs the real tiny model.
"""

from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx
import openai
import pytest

from kimi_local.chat_format import encode_conversation
from kimi_local.server.app import create_app
from kimi_local.server.settings import ServerSettings
from test_server_support import FakeEngine, ThreadServer, tiny_tokenizer_and_args

TOOL_SCRIPT = ["Let me ", "check.", "<|tool_calls_section_begin|>", "<|tool_call_begin|>",
               "functions.get_weather:0", "<|tool_call_argument_begin|>", '{"city":', ' "Beijing"', "}",
               "<|tool_call_end|>", "<|tool_call_begin|>", " functions.get_time:1 ", "<|tool_call_argument_begin|>",
               '{"tz": "UTC"}', "<|tool_call_end|>", "<|tool_calls_section_end|>"]
TEXT_SCRIPT = ["It is ", "sunny ", "in Beijing", "."]

OA_TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Get weather information",
                                      "parameters": {"type": "object", "required": ["city"],
                                                     "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time",
                                      "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
]
AN_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
             "input_schema": t["function"]["parameters"]} for t in OA_TOOLS]
USER = [{"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."}]


@pytest.fixture(scope="module")
def tiny():
    return tiny_tokenizer_and_args()


@pytest.fixture(scope="module")
def engine(tiny):
    tok, args, _ = tiny
    return FakeEngine(tok, args, TOOL_SCRIPT)


@pytest.fixture(scope="module")
def server(tiny, engine):
    app = create_app(ServerSettings(max_queue=1, max_body_mb=0.05), engine=engine, model_dir=tiny[2])
    with ThreadServer(app) as srv:
        yield srv


@pytest.fixture
def script(engine):
    """Set the fake engine's script for one test; restore the tool script afterwards."""
    def set_script(pieces, delay=0.0, fail_at=None):
        engine.script, engine.delay, engine.fail_at = pieces, delay, fail_at
    yield set_script
    engine.script, engine.delay, engine.fail_at = TOOL_SCRIPT, 0.0, None


@pytest.fixture
def oa(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture
def an(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)


def sse_events(server, path: str, body: dict) -> list:
    """POST with stream=True; return the parsed ``data:`` payloads (and the literal "[DONE]")."""
    out, event_names = [], []
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                event_names.append(line[7:])
            elif line.startswith("data: "):
                out.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return out if not event_names else list(zip(event_names, out))


# --------------------------------------------------------------------------------- tool-call shapes

def test_openai_tool_calls_non_stream(oa):
    r = oa.chat.completions.create(model="kimi", messages=USER, tools=OA_TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [c.id for c in calls] == ["functions.get_weather:0", "functions.get_time:1"]
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].function.arguments) == {"city": "Beijing"}
    assert json.loads(calls[1].function.arguments) == {"tz": "UTC"}
    assert all(c.type == "function" for c in calls)
    assert "<|" not in (choice.message.content or "")


def test_openai_tool_calls_stream(server):
    chunks = sse_events(server, "/v1/chat/completions", {"messages": USER, "tools": OA_TOOLS})
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content, calls = "", {}
    for c in chunks:
        d = c["choices"][0]["delta"]
        content += d.get("content") or ""
        for tc in d.get("tool_calls") or []:
            slot = calls.setdefault(tc["index"], {"id": None, "name": "", "arguments": ""})
            if tc.get("id"):
                assert slot["id"] is None, "id sent twice"
                slot["id"] = tc["id"]
                assert tc["type"] == "function"
            slot["name"] += tc.get("function", {}).get("name") or ""
            slot["arguments"] += tc.get("function", {}).get("arguments") or ""
    assert content == "Let me check."
    assert calls[0] == {"id": "functions.get_weather:0", "name": "get_weather", "arguments": '{"city": "Beijing"}'}
    assert calls[1] == {"id": "functions.get_time:1", "name": "get_time", "arguments": '{"tz": "UTC"}'}
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("tool_calls") == 1
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "timings" in chunks[-1] and "usage" in chunks[-1]


def test_openai_stream_with_client_accumulation(oa):
    """Moonshot's guide accumulates deltas by index; the official client must be able to do it."""
    stream = oa.chat.completions.create(model="kimi", messages=USER, tools=OA_TOOLS, stream=True,
                                        stream_options={"include_usage": True})
    calls, finish, usage = {}, None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            slot = calls.setdefault(tc.index, {"name": "", "arguments": ""})
            slot["name"] += tc.function.name or ""
            slot["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert {v["name"] for v in calls.values()} == {"get_weather", "get_time"}
    assert usage is not None and usage.completion_tokens == len(TOOL_SCRIPT) + 1


def test_anthropic_tool_use_non_stream(an):
    m = an.messages.create(model="claude-x", max_tokens=100, messages=USER, tools=AN_TOOLS)
    assert m.stop_reason == "tool_use"
    assert [b.type for b in m.content] == ["text", "tool_use", "tool_use"]
    assert m.content[0].text == "Let me check."
    assert (m.content[1].id, m.content[1].name, m.content[1].input) == \
        ("functions.get_weather:0", "get_weather", {"city": "Beijing"})
    assert (m.content[2].name, m.content[2].input) == ("get_time", {"tz": "UTC"})
    assert m.usage.output_tokens == len(TOOL_SCRIPT) + 1


def test_anthropic_tool_use_stream(server, an):
    events = sse_events(server, "/v1/messages", {"model": "c", "max_tokens": 100, "messages": USER,
                                                  "tools": AN_TOOLS})
    names = [e for e, _ in events]
    assert all(e == d["type"] for e, d in events)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    blocks = [d["content_block"] for e, d in events if e == "content_block_start"]
    assert [b["type"] for b in blocks] == ["text", "tool_use", "tool_use"]
    assert blocks[1]["id"] == "functions.get_weather:0" and blocks[1]["input"] == {}
    partial = "".join(d["delta"]["partial_json"] for e, d in events
                      if e == "content_block_delta" and d["index"] == 1)
    assert json.loads(partial) == {"city": "Beijing"}
    assert [d["delta"]["type"] for e, d in events if e == "content_block_delta" and d["index"] == 0] == \
        ["text_delta"] * len([1 for e, d in events if e == "content_block_delta" and d["index"] == 0])
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    # the official client's accumulator agrees
    with an.messages.stream(model="c", max_tokens=100, messages=USER, tools=AN_TOOLS) as s:
        final = s.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use", "tool_use"]
    assert final.content[1].input == {"city": "Beijing"} and final.stop_reason == "tool_use"


@pytest.mark.parametrize("choice, forced", [
    ("required", "<|tool_calls_section_begin|>"),
    ({"type": "function", "function": {"name": "get_time"}},
     "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_time:0<|tool_call_argument_begin|>"),
])
def test_tool_choice_forcing_prefix(oa, engine, tiny, script, choice, forced):
    """required/named tool_choice end the prompt with the call prefix; the output parser sees it too."""
    tok = tiny[0]
    if isinstance(choice, dict):
        script(['{"tz": ', '"UTC"}', "<|tool_call_end|>", "<|tool_calls_section_end|>"])
    else:
        script(TOOL_SCRIPT[3:])
    captured = {}
    real = engine.generate

    def spy(prompt_ids, params, cancel=None):
        captured["ids"] = list(prompt_ids)
        return real(prompt_ids, params, cancel)

    engine.generate = spy
    try:
        r = oa.chat.completions.create(model="k", messages=USER, tools=OA_TOOLS, tool_choice=choice)
    finally:
        del engine.generate
    base = encode_conversation(tok, USER, tools=OA_TOOLS, template=None)
    assert tok.decode(captured["ids"]).endswith(forced)
    assert len(captured["ids"]) == len(base) + len(tok.encode(forced, allow_special=True))
    assert r.choices[0].finish_reason == "tool_calls"
    names = [c.function.name for c in r.choices[0].message.tool_calls]
    assert names == (["get_time"] if isinstance(choice, dict) else ["get_weather", "get_time"])
    assert r.usage.prompt_tokens == len(captured["ids"])


def test_tool_choice_none_hides_tools_and_drops_calls(oa, engine, tiny):
    captured = {}
    real = engine.generate

    def spy(prompt_ids, params, cancel=None):
        captured["ids"] = list(prompt_ids)
        return real(prompt_ids, params, cancel)

    engine.generate = spy
    try:
        r = oa.chat.completions.create(model="k", messages=USER, tools=OA_TOOLS, tool_choice="none")
    finally:
        del engine.generate
    assert "tool_declare" not in tiny[0].decode(captured["ids"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == "Let me check."  # the section is parsed away, not leaked


def test_tool_choice_errors(oa):
    with pytest.raises(openai.BadRequestError, match="not among the declared tools"):
        oa.chat.completions.create(model="k", messages=USER, tools=OA_TOOLS,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="needs at least one tool"):
        oa.chat.completions.create(model="k", messages=USER, tool_choice="required")


def test_model_card_tool_loop(oa, engine, tiny, script):
    """The model card's get_weather loop, verbatim apart from base_url, against scripted output: a tool call
    on the first turn, text on the second; the tool result goes back through the template."""
    prompts = []

    def pieces(prompt_ids):
        prompts.append(list(prompt_ids))
        return TOOL_SCRIPT[:10] + ["<|tool_calls_section_end|>"] if len(prompts) == 1 else TEXT_SCRIPT

    script(pieces)

    def get_weather(city: str) -> dict:
        return {"weather": "Sunny"}

    tool_map = {"get_weather": get_weather}
    messages = [{"role": "system", "content": "You are Kimi, an AI assistant created by Moonshot AI."},
                {"role": "user", "content": "What's the weather like in Beijing today? Use the tool to check."}]
    finish_reason = None
    while finish_reason is None or finish_reason == "tool_calls":
        completion = oa.chat.completions.create(model="kimi-k2", messages=messages, temperature=0.6,
                                                tools=OA_TOOLS[:1], tool_choice="auto")
        choice = completion.choices[0]
        finish_reason = choice.finish_reason
        if finish_reason == "tool_calls":
            messages.append(choice.message)
            for tool_call in choice.message.tool_calls:
                tool_call_name = tool_call.function.name
                tool_call_arguments = json.loads(tool_call.function.arguments)
                tool_function = tool_map[tool_call_name]
                tool_result = tool_function(**tool_call_arguments)
                messages.append({"role": "tool", "tool_call_id": tool_call.id, "name": tool_call_name,
                                 "content": json.dumps(tool_result)})
    assert choice.message.content == "It is sunny in Beijing."
    second = tiny[0].decode(prompts[1])
    assert ("<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
            '{"city": "Beijing"}<|tool_call_end|>') in second
    assert '<|im_system|>get_weather<|im_middle|>## Return of functions.get_weather:0\n{"weather": "Sunny"}' \
        in second


def test_anthropic_tool_loop_round_trip(an, engine, tiny, script):
    """tool_use -> tool_result through the Anthropic client; foreign-looking ids survive the round trip."""
    prompts = []

    def pieces(prompt_ids):
        prompts.append(list(prompt_ids))
        return TEXT_SCRIPT

    script(pieces)
    msgs = USER + [
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "toolu_01", "name": "get_weather",
                                           "input": {"city": "Beijing"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                      "content": [{"type": "text", "text": '{"weather": "Sunny"}'}]},
                                     {"type": "text", "text": "Thanks!"}]}]
    m = an.messages.create(model="c", max_tokens=50, system=[{"type": "text", "text": "Be brief."}],
                           messages=msgs, tools=AN_TOOLS)
    assert m.content[0].text == "It is sunny in Beijing." and m.stop_reason == "end_turn"
    text = tiny[0].decode(prompts[0])
    assert "<|im_system|>system<|im_middle|>Be brief.<|im_end|>" in text
    assert "Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0" in text
    assert "## Return of functions.get_weather:0\n{\"weather\": \"Sunny\"}<|im_end|>" \
           "<|im_user|>user<|im_middle|>Thanks!" in text


def test_markers_never_leak_when_no_tools(oa):
    r = oa.chat.completions.create(model="k", messages=USER)
    assert r.choices[0].message.content == "Let me check." and r.choices[0].message.tool_calls is None


def test_timings_everywhere(server, an, oa):
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER}).json()
    assert {"cache_n", "prompt_per_second", "predicted_per_second"} <= set(r["timings"])
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json()
    assert r["timings"]["predicted_n"] == 3 and r["choices"][0]["finish_reason"] == "length"
    r = httpx.post(server.url + "/v1/messages", json={"max_tokens": 5, "messages": USER}).json()
    assert "timings" in r and r["stop_reason"] == "max_tokens"
    events = sse_events(server, "/v1/messages", {"max_tokens": 5, "messages": USER})
    assert "timings" in events[-2][1]


# --------------------------------------------------------------------------------- errors, queue, health

def test_internal_error_is_500_and_server_survives(server, oa, script):
    script(TEXT_SCRIPT, fail_at=2)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER})
    assert r.status_code == 500 and "error" in r.json() and "Traceback" not in r.text
    r = httpx.post(server.url + "/v1/messages", json={"max_tokens": 9, "messages": USER})
    assert r.status_code == 500 and r.json()["type"] == "error"
    chunks = sse_events(server, "/v1/chat/completions", {"messages": USER})
    assert "error" in chunks[-1]  # in-band: the headers had gone out
    script(TEXT_SCRIPT)
    assert oa.chat.completions.create(model="k", messages=USER).choices[0].message.content == \
        "It is sunny in Beijing."


def test_queue_full_429(server, oa, script):
    script(TEXT_SCRIPT * 10, delay=0.05)  # ~2 s per generation
    results = {}

    def call(name):
        results[name] = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER}, timeout=30)

    first = threading.Thread(target=call, args=("running",))
    first.start()
    time.sleep(0.3)
    second = threading.Thread(target=call, args=("queued",))
    second.start()
    time.sleep(0.3)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER}, timeout=30)  # max_queue=1
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    r = httpx.post(server.url + "/v1/messages", json={"max_tokens": 5, "messages": USER}, timeout=30)
    assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    metrics = httpx.get(server.url + "/metrics").text
    assert "kimi_local_requests_deferred 1" in metrics and "kimi_local_requests_processing 1" in metrics
    first.join()
    second.join()
    assert results["running"].status_code == 200 and results["queued"].status_code == 200


def test_disconnect_mid_stream_cancels(server, engine, oa, script):
    script(TEXT_SCRIPT * 50, delay=0.05)  # 200 steps, 10 s if not cancelled
    before = len(engine.steps_after_cancel)
    t0 = time.time()
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"messages": USER, "stream": True}, timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    # the generation must stop promptly and free the engine for the next request
    script(TEXT_SCRIPT)
    r = oa.chat.completions.create(model="k", messages=USER)
    assert r.choices[0].message.content == "It is sunny in Beijing."
    assert time.time() - t0 < 5
    assert len(engine.steps_after_cancel) == before + 1
    assert "kimi_local_generations_cancelled_total 1" in httpx.get(server.url + "/metrics").text


def test_disconnect_non_stream_cancels(server, engine, script):
    script(TEXT_SCRIPT * 50, delay=0.05)
    before = len(engine.steps_after_cancel)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json={"messages": USER}, timeout=0.5)
    deadline = time.time() + 5
    while len(engine.steps_after_cancel) == before and time.time() < deadline:
        time.sleep(0.05)
    assert len(engine.steps_after_cancel) == before + 1


BAD_REQUESTS = [
    # path, body (dict, or raw bytes), status, text the error must contain
    ("/v1/chat/completions", b"{not json", 400, "JSON"),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "tool_call_id": "call_1", "content": "x"}]}, 400,
     "tool_call_id"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function", "function": {"name": "f",
                                                                                           "parameters": "x"}}]},
     400, "parameters"),
    ("/v1/chat/completions", {"messages": USER, "tools": [{"type": "function"}]}, 400, "function"),
    ("/v1/chat/completions", {"messages": USER, "temperature": 7}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": USER, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": USER, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"5": 1000}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": USER, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": USER, "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": USER, "seed": 2**70}, 400, "seed"),
    ("/v1/chat/completions", {"messages": USER, "x" * 10: "y" * 60000}, 413, "limit"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "batch"),
    ("/v1/messages", {"messages": USER}, 400, "max_tokens"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, 400, "role"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, 400, "image"),
    ("/v1/messages", {"max_tokens": 5, "messages": USER, "temperature": 1.5}, 400, "temperature"),
    ("/v1/messages", {"max_tokens": 5, "messages": USER, "tool_choice": {"type": "tool"}}, 400, "name"),
    ("/v1/messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "nope", "content": "x"}]}]}, 400, "tool_call_id"),
    ("/v1/messages", b"[1, 2", 400, "JSON"),
    ("/v1/messages/count_tokens", {"messages": []}, 400, "messages"),
    ("/v1/messages", {"max_tokens": 5, "messages": USER, "pad": "z" * 60000}, 413, "limit"),
]


@pytest.mark.parametrize("path, body, status, needle", BAD_REQUESTS,
                         ids=[f"{p}-{i}" for i, (p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_input(server, path, body, status, needle):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server.url + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    data = r.json()
    if path.startswith("/v1/messages"):
        assert data["type"] == "error" and set(data["error"]) >= {"type", "message"}
        message = data["error"]["message"]
    else:
        assert set(data["error"]) >= {"message", "type", "code"}
        message = data["error"]["message"]
    assert needle.lower() in message.lower(), message
    assert "Traceback" not in r.text


def test_context_overflow_names_both_numbers(server, tiny):
    long = "word " * 3000
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "maximum context length is 2048 tokens" in err["message"]
    n = int(err["message"].split("resulted in ")[1].split()[0])
    assert n > 2048
    r = httpx.post(server.url + "/v1/messages", json={"max_tokens": 5, "messages": [{"role": "user",
                                                                                      "content": long}]})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert message.startswith(f"prompt is too long: {n} tokens") and "2048" in message


def test_not_found_and_method(server):
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.get(server.url + "/v1/models/other-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_unknown_fields_ignored(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}], "extra": 1}],
        "model": "whatever", "user": "me", "parallel_tool_calls": False, "response_format": {"type": "text"},
        "metadata": {"a": "b"}, "logprobs": False, "something_new": [1, 2, 3]})
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/messages", json={"max_tokens": 5, "messages": USER, "metadata": {"user_id": "u"},
                                                      "thinking": {"type": "disabled"}, "new_field": 1})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------------- auth

@pytest.fixture(scope="module")
def keyed_server(tiny):
    tok, args, d = tiny
    app = create_app(ServerSettings(api_key="s3cret"), engine=FakeEngine(tok, args, TEXT_SCRIPT), model_dir=d)
    with ThreadServer(app) as srv:
        yield srv


def test_auth(keyed_server):
    url = keyed_server.url
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
    assert ok.chat.completions.create(model="k", messages=USER).choices[0].message.content
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
            model="c", max_tokens=5, messages=USER)
    assert anthropic.Anthropic(base_url=url, api_key="s3cret", max_retries=0).messages.create(
        model="c", max_tokens=5, messages=USER).content
    # Claude Code's ANTHROPIC_AUTH_TOKEN sends a bearer token instead of x-api-key
    assert anthropic.Anthropic(base_url=url, auth_token="s3cret", max_retries=0).messages.count_tokens(
        model="c", messages=USER).input_tokens > 0
    r = httpx.post(url + "/v1/messages", json={"max_tokens": 5, "messages": USER})
    assert r.status_code == 401 and r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER}, headers={"x-api-key": "s3cret"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # health stays open for scripts


def test_alias_and_settings_from_cli(tiny, monkeypatch):
    import argparse

    parser = argparse.ArgumentParser()
    ServerSettings.add_arguments(parser)
    monkeypatch.setenv("KIMI_LOCAL_API_KEY", "from-env")
    settings = ServerSettings.from_args(parser.parse_args(["--alias", "kimi-k2", "--max-queue", "3", "--port", "9"]))
    assert (settings.alias, settings.max_queue, settings.port, settings.host) == ("kimi-k2", 3, 9, "127.0.0.1")
    assert settings.api_key == "from-env"
    tok, args, d = tiny
    app = create_app(ServerSettings(alias="kimi-k2"), engine=FakeEngine(tok, args, TEXT_SCRIPT), model_dir=d)
    with ThreadServer(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["kimi-k2"]
        assert client.chat.completions.create(model="anything", messages=USER).model == "kimi-k2"


# --------------------------------------------------------------------------------- loading

def test_health_while_loading(tiny):
    tok, args, d = tiny
    app = create_app(ServerSettings())
    state = app.state.kimi
    gate = threading.Event()

    def load(model_dir, progress):
        progress(25, 100)
        gate.wait(10)
        progress(100, 100)
        return FakeEngine(tok, args, TEXT_SCRIPT), d

    with ThreadServer(app) as srv:
        state.load_in_background(None, load)
        time.sleep(0.2)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["progress"] == 0.25
        assert r.json()["error"]["message"].startswith("Loading model")
        r = httpx.post(srv.url + "/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 503 and "Loading model" in r.json()["error"]["message"]
        assert "retry-after" in r.headers
        r = httpx.post(srv.url + "/v1/messages", json={"max_tokens": 5, "messages": USER})
        assert r.status_code == 503 and r.json()["error"]["type"] == "overloaded_error"
        gate.set()
        deadline = time.time() + 10
        while httpx.get(srv.url + "/health").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
        assert httpx.post(srv.url + "/v1/chat/completions", json={"messages": USER}).status_code == 200


def test_health_after_failed_load():
    app = create_app(ServerSettings())

    def load(model_dir, progress):
        raise FileNotFoundError("no such model")

    with ThreadServer(app) as srv:
        app.state.kimi.load_in_background("/nowhere", load).join(5)
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and "no such model" in r.json()["error"]["message"]


# --------------------------------------------------------------------------------- fuzz

def test_fuzz_random_json_bodies_no_5xx(server):
    """Hypothesis-generated JSON (arbitrary, and shaped like each API's requests) never gets a 5xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    anyjson = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=12)
    role = st.sampled_from(["system", "user", "assistant", "tool", "developer", "bogus"])
    message = st.fixed_dictionaries({"role": role}, optional={
        "content": anyjson | st.text(max_size=30) | st.lists(st.fixed_dictionaries(
            {"type": st.sampled_from(["text", "image_url", "tool_use", "tool_result", "x"])},
            optional={"text": anyjson, "id": anyjson, "input": anyjson, "tool_use_id": anyjson,
                      "content": anyjson}), max_size=3),
        "tool_calls": anyjson | st.lists(st.fixed_dictionaries({"id": st.text(max_size=8), "function":
                                         st.fixed_dictionaries({"name": st.text(max_size=8), "arguments": anyjson})}),
                                         max_size=2),
        "tool_call_id": anyjson, "name": anyjson})
    fields = {"messages": st.lists(message, max_size=4) | anyjson, "max_tokens": anyjson | st.integers(-3, 5),
              "temperature": anyjson, "top_p": anyjson, "stop": anyjson, "seed": anyjson, "n": anyjson,
              "logit_bias": anyjson, "tools": anyjson, "tool_choice": anyjson, "stream": st.booleans() | anyjson,
              "prompt": anyjson, "system": anyjson, "stop_sequences": anyjson, "stream_options": anyjson,
              "top_k": anyjson, "max_completion_tokens": anyjson}
    body = st.fixed_dictionaries({}, optional=fields) | anyjson
    path = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/messages/count_tokens"])
    client = httpx.Client(base_url=server.url, timeout=30)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=path, body=body)
    def run(path, body):
        r = client.post(path, json=body)
        assert r.status_code < 500, (path, body, r.text)
        assert r.status_code in (200, 400, 413, 429), (path, body, r.status_code, r.text)

    try:
        run()
    finally:
        client.close()


def test_fuzz_openapi_schema_no_5xx(server, tiny):
    """schemathesis over /openapi.json (positive and negative cases): no operation answers 5xx."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    ops = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/chat/completions", "/v1/messages", "/v1/completions"}
    for op in ops:
        strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE) | \
            op.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=strategy)
        def run(case):
            r = case.call(base_url=server.url)
            assert r.status_code < 500, (op.method, op.path, case.body, r.text)

        run()
