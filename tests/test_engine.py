"""The generation engine on the tiny random-weight model (float32, torch expert backend)."""

import threading

import pytest
import torch

import kimi_local.engine as engine_mod
from kimi_local.checkpoint import load_model
from kimi_local.engine import ContextOverflowError, Engine, GenerationChunk, Timings, split_at_stop
from kimi_local.errors import UserError
from kimi_local.sampling import SamplingError, SamplingParams, make_sampler
from kimi_local.tiny import ensure_tiny
from kimi_local.tokenizer import KimiTokenizer

GREEDY = dict(temperature=0.0, stop_token_ids=[])  # no stop token: runs always reach max_tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's ops are too small to split: OpenMP threads only add overhead (20x on a busy box).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def parts(one_thread):
    d = ensure_tiny()
    model = load_model(d, dtype=torch.float32, expert_backend="torch")
    return model, KimiTokenizer.from_model_dir(d)


@pytest.fixture
def engine(parts):
    model, tok = parts
    return Engine(model, tok, ctx=128, prefill_chunk=8)


@pytest.fixture(scope="module")
def prompt(parts):
    _, tok = parts
    return tok.encode("The quick brown fox jumps over the lazy dog. " * 2)


def run(engine, prompt, cancel=None, **kw):
    """Consume a generation; return (chunks, text, token ids, final chunk)."""
    chunks = list(engine.generate(prompt, SamplingParams(**kw), cancel))
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason is not None and chunks[-1].timings is not None
    return chunks, "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1]


@pytest.fixture
def record_logits(monkeypatch):
    """Record the logits the engine hands to its sampler at every decode step."""
    seen = []

    def recording(params):
        inner = make_sampler(params)

        def sample(logits, history):
            seen.append(logits.clone())
            return inner(logits, history)
        return sample

    monkeypatch.setattr(engine_mod, "make_sampler", recording)
    return seen


# ------------------------------------------------------------------ stop-string splitting (pure)


def test_split_at_stop():
    assert split_at_stop("hello", []) == ("hello", "", None)
    assert split_at_stop("hello wor", ["world"]) == ("hello ", "wor", None)
    assert split_at_stop("hello world!", ["world"]) == ("hello ", "", "world")
    assert split_at_stop("abcab", ["abd", "b!"]) == ("abc", "ab", None)    # longest possible prefix held
    assert split_at_stop("xab", ["ab", "xa"]) == ("", "", "xa")            # earliest match wins
    assert split_at_stop("aaa", ["aaaa"]) == ("", "aaa", None)
    assert split_at_stop("", ["x"]) == ("", "", None)


# ------------------------------------------------------------------ determinism and prefix reuse


def test_greedy_is_deterministic_and_independent_of_cache(engine, prompt):
    _, text1, ids1, last1 = run(engine, prompt, max_tokens=12, **GREEDY)
    assert len(ids1) == 12 and last1.finish_reason == "length"
    # same prompt again: everything but the last prompt token comes from the cache
    _, text2, ids2, last2 = run(engine, prompt, max_tokens=12, **GREEDY)
    assert last2.timings.cached_tokens == len(prompt) - 1
    engine.reset()
    _, text3, ids3, last3 = run(engine, prompt, max_tokens=12, **GREEDY)
    assert last3.timings.cached_tokens == 0
    assert ids1 == ids2 == ids3 and text1 == text2 == text3


def test_prefix_reuse_gives_fresh_prefill_logits(parts, engine, prompt, record_logits):
    model, _ = parts
    _, _, ids, _ = run(engine, prompt, max_tokens=4, **GREEDY)
    # The next "turn": prompt + reply + new text.  Only the new tokens may be prefilled.
    turn2 = prompt + ids + prompt[:5]
    record_logits.clear()
    _, _, ids2, last = run(engine, turn2, max_tokens=3, **GREEDY)
    assert last.timings.cached_tokens == len(prompt) + len(ids) - 1  # the last reply token was never forwarded
    reused = record_logits[:]
    # oracle: the model directly, whole sequence, no cache
    full = model.forward(torch.tensor([turn2 + ids2[:-1]]))[0]
    for step, logits in enumerate(reused):
        torch.testing.assert_close(logits, full[len(turn2) - 1 + step, :logits.numel()], atol=1e-4, rtol=1e-4)
    # and a fresh engine with a different prefill chunking agrees token for token
    fresh = Engine(model, engine.tokenizer, ctx=128, prefill_chunk=512)
    record_logits.clear()
    _, _, ids3, last3 = run(fresh, turn2, max_tokens=3, **GREEDY)
    assert last3.timings.cached_tokens == 0 and ids3 == ids2
    for a, b in zip(reused, record_logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_diverging_prompt_reuses_only_shared_prefix(engine, prompt):
    run(engine, prompt, max_tokens=2, **GREEDY)
    other = prompt[:10] + [t + 1 for t in prompt[10:15]]
    _, _, ids, last = run(engine, other, max_tokens=5, **GREEDY)
    assert last.timings.cached_tokens == 10
    engine.reset()
    assert run(engine, other, max_tokens=5, **GREEDY)[2] == ids


def test_seeded_sampling_reproduces(engine, prompt):
    kw = dict(temperature=1.0, stop_token_ids=[], max_tokens=16)
    a = run(engine, prompt, seed=11, **kw)[2]
    b = run(engine, prompt, seed=11, **kw)[2]
    c = run(engine, prompt, seed=12, **kw)[2]
    assert a == b
    assert a != c


# ------------------------------------------------------------------ stopping


def test_max_tokens_and_timings(engine, prompt):
    chunks, text, ids, last = run(engine, prompt, max_tokens=5, **GREEDY)
    assert len(chunks) == 5 and all(len(c.token_ids) == 1 for c in chunks)
    assert last.finish_reason == "length" and last.stop_reason is None
    t = last.timings
    assert isinstance(t, Timings)
    assert (t.prompt_tokens, t.generated_tokens) == (len(prompt), 5)
    assert t.prefill_seconds > 0 and t.decode_seconds > 0 and t.prefill_tok_s > 0 and t.decode_tok_s > 0
    assert set(t.to_dict()) == {"prompt_tokens", "cached_tokens", "generated_tokens", "prefill_seconds",
                                "decode_seconds", "prefill_tok_s", "decode_tok_s"}
    assert text == engine.tokenizer.decode(ids)


def test_stop_string_across_token_boundary_is_caught_and_hidden(engine, prompt):
    chunks, full, ids, _ = run(engine, prompt, max_tokens=40, **GREEDY)
    # Find a string whose first occurrence straddles the boundary between two tokens' texts.
    pieces = [c.text for c in chunks]
    stop = None
    offset = 0
    for i in range(len(pieces) - 1):
        offset += len(pieces[i])
        left, right = pieces[i][-2:], pieces[i + 1][:2]
        if left and right and full.find(left + right) == offset - len(left):
            stop, at = left + right, offset - len(left)
            break
    assert stop is not None, f"no cross-token string in {pieces!r}"

    chunks2, text2, ids2, last = run(engine, prompt, max_tokens=40, stop=[stop], **GREEDY)
    assert last.finish_reason == "stop" and last.stop_reason == stop
    assert text2 == full[:at]
    assert stop not in text2
    assert ids2 == ids[:len(ids2)] and len(ids2) == i + 2  # the token completing the stop string is accepted
    # while streaming, text is never shown ahead of what the final answer keeps
    shown = ""
    for c in chunks2:
        shown += c.text
        assert full[:at].startswith(shown)


def test_held_back_text_is_released_when_stop_string_does_not_complete(engine, prompt):
    _, full, _, _ = run(engine, prompt, max_tokens=10, **GREEDY)
    stop = full[-1] + "\x00never"  # its first character ends the output: held back, then released at the end
    _, text, _, last = run(engine, prompt, max_tokens=10, stop=[stop], **GREEDY)
    assert text == full and last.finish_reason == "length"


def test_stop_token_is_never_shown(engine, prompt):
    tok = engine.tokenizer
    im_end = tok.special_ids["<|im_end|>"]
    chunks, text, ids, last = run(engine, prompt, temperature=0.0, logit_bias={im_end: 100})
    assert len(chunks) == 1
    assert (text, ids, last.finish_reason, last.stop_reason) == ("", [], "stop", "<|im_end|>")
    assert last.timings.generated_tokens == 1
    # with stop tokens switched off it is plain text
    _, text, ids, _ = run(engine, prompt, max_tokens=2, logit_bias={im_end: 100}, **GREEDY)
    assert ids == [im_end, im_end] and text == "<|im_end|><|im_end|>"


def test_tool_call_markers_come_through_as_text(engine, prompt):
    tok = engine.tokenizer
    begin = tok.special_ids["<|tool_calls_section_begin|>"]
    _, text, ids, _ = run(engine, prompt, max_tokens=1, temperature=0.0, logit_bias={begin: 100})
    assert ids == [begin] and text == "<|tool_calls_section_begin|>"


def test_generation_that_fills_the_context_ends_with_length(parts, prompt):
    model, tok = parts
    eng = Engine(model, tok, ctx=len(prompt) + 3)
    _, _, ids, last = run(eng, prompt, **GREEDY)  # no max_tokens: until the context is full
    assert len(ids) == 3 and last.finish_reason == "length"
    _, _, ids, last = run(eng, prompt, max_tokens=50, **GREEDY)
    assert len(ids) == 3 and last.finish_reason == "length"


# ------------------------------------------------------------------ errors before any work


def test_context_overflow_is_raised_before_any_work(parts, prompt, monkeypatch):
    model, tok = parts
    eng = Engine(model, tok, ctx=len(prompt))
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(ContextOverflowError) as e:
        eng.generate(prompt, SamplingParams())  # raised at call time, not on first next()
    assert (e.value.prompt_tokens, e.value.ctx_len) == (len(prompt), len(prompt))
    assert str(len(prompt)) in str(e.value) and isinstance(e.value, UserError)
    assert calls == [] and eng.stats()["requests"] == 0


def test_bad_inputs_raise_at_call_time(engine, prompt):
    with pytest.raises(SamplingError, match="top_p"):
        engine.generate(prompt, SamplingParams(top_p=0))
    with pytest.raises(UserError, match="empty"):
        engine.generate([], SamplingParams())
    with pytest.raises(UserError, match="vocabulary"):
        engine.generate([engine.args.vocab_size], SamplingParams())
    with pytest.raises(UserError, match="ctx"):
        Engine(engine.model, engine.tokenizer, ctx=engine.args.max_position_embeddings + 1)


def test_default_ctx_is_capped(parts):
    model, tok = parts
    eng = Engine(model, tok)
    assert eng.ctx_len == min(model.args.max_position_embeddings, engine_mod.DEFAULT_CTX_CAP)


# ------------------------------------------------------------------ cancellation and early exit


def test_cancellation_between_steps(engine, prompt):
    cancel = threading.Event()
    chunks = []
    for c in engine.generate(prompt, SamplingParams(max_tokens=30, **GREEDY), cancel):
        chunks.append(c)
        if len(chunks) == 3:
            cancel.set()
    assert [c.finish_reason for c in chunks] == [None, None, None, "cancelled"]
    assert chunks[-1].token_ids == [] and chunks[-1].timings.generated_tokens == 3
    assert not engine._lock.locked()
    # cancelled before it starts: no prefill at all
    cancel2 = threading.Event()
    cancel2.set()
    _, text, ids, last = run(engine, prompt + [5], cancel2, **GREEDY)
    assert (text, ids, last.finish_reason) == ("", [], "cancelled")


def test_generator_closed_early_leaves_engine_consistent(engine, prompt):
    _, _, want, _ = run(engine, prompt, max_tokens=8, **GREEDY)
    engine.reset()
    gen = engine.generate(prompt, SamplingParams(max_tokens=8, **GREEDY))
    got = [next(gen).token_ids[0] for _ in range(3)]
    gen.close()
    assert not engine._lock.locked()
    assert got == want[:3]
    # tokens 1 and 2 were forwarded; token 3 was yielded but its forward never ran
    assert engine.cached_tokens == prompt + got[:2]
    _, _, rest, last = run(engine, prompt + got, max_tokens=5, **GREEDY)
    assert last.timings.cached_tokens == len(prompt) + 2
    assert got + rest == want


def test_exception_mid_forward_leaves_engine_consistent(parts, engine, prompt, monkeypatch):
    model, _ = parts
    _, _, want, _ = run(engine, prompt, max_tokens=6, **GREEDY)
    engine.reset()
    real = model.forward
    calls = {"n": 0}

    def flaky(tokens, start_pos=0, cache=None, last_only=False):
        calls["n"] += 1
        if calls["n"] == n_prefill + 1:  # the first decode step
            real(tokens, start_pos, cache, last_only)  # writes the cache, then fails
            raise RuntimeError("boom")
        return real(tokens, start_pos, cache, last_only)

    n_prefill = -(-len(prompt) // engine.prefill_chunk)
    monkeypatch.setattr(model, "forward", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        run(engine, prompt, max_tokens=6, **GREEDY)
    assert not engine._lock.locked()
    assert engine.cached_tokens == prompt  # the failed pass is not recorded
    monkeypatch.setattr(model, "forward", real)
    assert run(engine, prompt, max_tokens=6, **GREEDY)[2] == want


def test_one_generation_at_a_time(engine, prompt):
    _, _, want, _ = run(engine, prompt, max_tokens=6, **GREEDY)
    results, errors = [], []
    started = threading.Event()

    def worker():
        try:
            results.append(run(engine, prompt, max_tokens=6, **GREEDY)[2])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    gen = engine.generate(prompt, SamplingParams(max_tokens=6, **GREEDY))
    first = next(gen)  # holds the lock now
    t = threading.Thread(target=worker)
    t.start()
    t.join(0.5)
    assert t.is_alive() and not results  # waiting for the lock
    rest = [c.token_ids[0] for c in gen]
    t.join(30)
    assert not errors and results == [want]
    assert first.token_ids + rest == want


def test_stats_accumulate(engine, prompt):
    before = engine.stats()
    run(engine, prompt, max_tokens=4, **GREEDY)
    run(engine, prompt, max_tokens=4, **GREEDY)
    s = engine.stats()
    assert s["requests"] == before["requests"] + 2
    assert s["prompt_tokens"] == before["prompt_tokens"] + 2 * len(prompt)
    assert s["generated_tokens"] == before["generated_tokens"] + 8
    assert s["cached_tokens"] >= before["cached_tokens"] + len(prompt) - 1
    assert s["last"]["generated_tokens"] == 4 and s["ctx_len"] == 128
    assert isinstance(GenerationChunk("", [], None), GenerationChunk)


def test_chunks_may_be_pulled_from_different_threads(engine, prompt):
    # Starlette's iterate_in_threadpool advances a sync generator from whichever worker is free.
    from concurrent.futures import ThreadPoolExecutor

    _, _, want, _ = run(engine, prompt, max_tokens=5, **GREEDY)
    gen = engine.generate(prompt, SamplingParams(max_tokens=5, **GREEDY))
    got = []
    with ThreadPoolExecutor(3) as pool:
        while True:
            c = pool.submit(next, gen, None).result()
            if c is None:
                break
            got += c.token_ids
    assert got == want and not engine._lock.locked()


def test_from_model_dir(parts):
    eng = Engine.from_model_dir(ensure_tiny(), ctx=64, dtype=torch.float32, expert_backend="torch")
    assert eng.ctx_len == 64 and eng.tokenizer.eos_ids
    prompt = eng.tokenizer.encode("hello")
    assert len(run(eng, prompt, max_tokens=3, **GREEDY)[2]) == 3
