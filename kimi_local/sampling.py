"""Token sampling: pure functions over one logits vector, and a factory that chains them.

Every step is a function ``logits[V] -> logits[V]`` (masked tokens become ``-inf``), so each can be
tested on a hand-made vector.  ``make_sampler(params)`` returns a closure
``sample(logits[V], history) -> token id`` with its own ``torch.Generator``: two samplers built
from the same seed draw the same tokens from the same logits.

Order of operations (vLLM's): logit bias, penalties, temperature, top-k, top-p, min-p, draw.
Temperature 0 is greedy: argmax after bias and penalties; the truncation filters cannot change it.

``history`` is the list of tokens generated so far in this request.  All three penalties look at
it and not at the prompt (OpenAI semantics for presence/frequency; applying the repetition penalty
to a chat prompt would penalise the template's own special tokens).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from kimi_local.errors import UserError

Sampler = Callable[[torch.Tensor, list], int]


class SamplingError(UserError, ValueError):
    """A sampling parameter out of range.  ``field`` names the parameter."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass
class SamplingParams:
    """Per-request sampling and stopping settings.

    Defaults follow Moonshot's recommendation for Kimi-K2-Instruct (temperature 0.6) and switch
    every other filter off.  ``stop_token_ids=None`` means the tokenizer's end-of-turn ids
    (``<|im_end|>`` and ``[EOS]``); ``max_tokens=None`` means "until the context is full".
    """

    temperature: float = 0.6        # 0 => greedy
    top_p: float = 1.0              # nucleus mass kept, (0, 1]
    top_k: int = 0                  # 0 => off
    min_p: float = 0.0              # keep tokens with p >= min_p * p_max; 0 => off
    presence_penalty: float = 0.0   # subtracted once from every token already generated, [-2, 2]
    frequency_penalty: float = 0.0  # subtracted per occurrence, [-2, 2]
    repetition_penalty: float = 1.0  # CTRL-style: divide positive / multiply negative logits; 1 => off
    seed: Optional[int] = None      # same seed => same output
    logit_bias: Optional[dict] = None  # token id -> added to its logit, [-100, 100]
    max_tokens: Optional[int] = None   # None => until context end
    stop: list = field(default_factory=list)      # user stop strings (never shown)
    stop_token_ids: Optional[list] = None         # None => tokenizer.eos_ids

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # OpenAI accepts a bare string
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        if isinstance(self.logit_bias, dict):  # JSON object keys arrive as strings: {"163586": -100}
            self.logit_bias = {int(k) if isinstance(k, str) and k.strip().lstrip("-").isdigit() else k: v
                               for k, v in self.logit_bias.items()}

    def validate(self, vocab_size: Optional[int] = None) -> None:
        """Raise ``SamplingError`` naming the first out-of-range field.

        ``vocab_size``, when given, also bounds the token ids in ``logit_bias`` and ``stop_token_ids``.
        """

        def number(name: str, lo: float, hi: float, lo_open: bool = False) -> float:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise SamplingError(name, f"must be a finite number, got {v!r}")
            if v < lo or v > hi or (lo_open and v == lo):
                interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
                raise SamplingError(name, f"must be in {interval}, got {v!r}")
            return v

        def token_id(name: str, t) -> None:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                limit = f" below the vocabulary size {vocab_size}" if vocab_size is not None else ""
                raise SamplingError(name, f"token id {t!r} must be a non-negative integer{limit}")

        number("temperature", 0.0, math.inf)
        number("top_p", 0.0, 1.0, lo_open=True)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise SamplingError("top_k", f"must be a non-negative integer (0 = off), got {self.top_k!r}")
        number("min_p", 0.0, 1.0)
        number("presence_penalty", -2.0, 2.0)
        number("frequency_penalty", -2.0, 2.0)
        number("repetition_penalty", 0.0, math.inf, lo_open=True)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise SamplingError("seed", f"must be an integer or null, got {self.seed!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise SamplingError("logit_bias", "must be a mapping of token id to bias")
            for t, b in self.logit_bias.items():
                token_id("logit_bias", t)
                if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                    raise SamplingError("logit_bias", f"bias for token {t} must be in [-100, 100], got {b!r}")
        if self.max_tokens is not None and (
                isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise SamplingError("max_tokens", f"must be a positive integer or null, got {self.max_tokens!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("stop", f"must be a list of non-empty strings, got {self.stop!r}")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple)):
                raise SamplingError("stop_token_ids", "must be a list of token ids or null")
            for t in self.stop_token_ids:
                token_id("stop_token_ids", t)


# ---------------------------------------------------------------------------------- logit transforms
# Each takes logits [V] (float32) and returns a new tensor; the input is never modified.


def apply_logit_bias(logits: torch.Tensor, bias: Optional[dict]) -> torch.Tensor:
    if not bias:
        return logits
    ids = torch.tensor(list(bias.keys()), dtype=torch.long, device=logits.device)
    vals = torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(0, ids, vals)


def apply_penalties(logits: torch.Tensor, history: list, presence: float = 0.0, frequency: float = 0.0,
                    repetition: float = 1.0) -> torch.Tensor:
    """Penalise tokens in ``history``: repetition (divide if > 0, multiply if < 0), then
    ``- presence - frequency * count`` (OpenAI's formula)."""
    if not history or (presence == 0.0 and frequency == 0.0 and repetition == 1.0):
        return logits
    ids, counts = torch.tensor(history, dtype=torch.long, device=logits.device).unique(return_counts=True)
    seen = logits[ids]
    if repetition != 1.0:
        seen = torch.where(seen > 0, seen / repetition, seen * repetition)
    seen = seen - presence - frequency * counts.to(logits.dtype)
    out = logits.clone()
    out[ids] = seen
    return out


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (ties with the k-th are kept too)."""
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, -math.inf)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches ``p``."""
    if p >= 1.0:
        return logits
    probs, order = torch.softmax(logits, dim=-1).sort(descending=True)
    mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p  # the most likely token always has mass_before 0 and survives
    drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep tokens whose probability is at least ``min_p`` times the top token's."""
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    return logits.masked_fill(probs < min_p * probs.max(), -math.inf)


def draw(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> int:
    """One categorical draw from ``probs`` [V] by the *exponential race*.

    With E_i ~ Exponential(1) i.i.d., ``argmax_i p_i / E_i`` is distributed as Categorical(p): the
    arrival time E_i / p_i of token i is Exponential(p_i), and the first arrival among independent
    exponentials is token i with probability p_i / sum(p).  (The same trick as DeepSeek-V3's and
    nano-vllm's ``probs.div_(torch.empty_like(probs).exponential_(1)).argmax()``: no cumsum, no host
    sync before the argmax.)  Zero-probability tokens can never win.
    """
    race = torch.empty_like(probs).exponential_(1, generator=generator).clamp_min_(1e-30)
    return int((probs / race).argmax())


# ---------------------------------------------------------------------------------- factory


def make_sampler(params: SamplingParams) -> Sampler:
    """Return ``sample(logits[V], history) -> token id`` for ``params``.

    The closure owns its random generator (seeded from ``params.seed``, or from the OS when
    None), created on the logits' device at the first call.  Logits are used as float32.
    """
    seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    generators: dict = {}

    def sample(logits: torch.Tensor, history: list) -> int:
        x = logits.float()
        x = apply_logit_bias(x, params.logit_bias)
        x = apply_penalties(x, history, params.presence_penalty, params.frequency_penalty,
                            params.repetition_penalty)
        if params.temperature == 0.0:
            return int(x.argmax())
        x = x / params.temperature
        x = apply_top_k(x, params.top_k)
        x = apply_top_p(x, params.top_p)
        x = apply_min_p(x, params.min_p)
        gen = generators.get(x.device)
        if gen is None:
            gen = generators[x.device] = torch.Generator(device=x.device).manual_seed(seed)
        return draw(torch.softmax(x, dim=-1), gen)

    return sample
