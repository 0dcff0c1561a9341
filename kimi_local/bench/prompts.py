"""Deterministic benchmark prompts: random ordinary (non-special) token ids."""

from __future__ import annotations

import random

N_SPECIAL = 256   # K2 keeps its special tokens in the last 256 ids


def random_prompt(n: int, vocab: int, seed: int = 0) -> list[int]:
    hi = vocab - N_SPECIAL if vocab > 2 * N_SPECIAL else vocab
    rng = random.Random(seed * 1_000_003 + n)
    return [rng.randrange(hi) for _ in range(n)]
