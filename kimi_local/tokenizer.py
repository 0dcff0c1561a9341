"""Kimi tokenizer: tiktoken byte-level BPE from ``tiktoken.model`` + special tokens from
``tokenizer_config.json`` (``added_tokens_decoder``).

- Kimi's pre-tokenizer regex (Han-aware, uses class intersection ``&&``, which tiktoken's engine supports).
- Special tokens sit at the ids the config gives them; ids in the reserved range without a name are
  ``<|reserved_token_{id}|>``.  No BOS is ever added.
- ``encode(text)`` never turns special-token strings inside text into special ids (no injection);
  ``encode(text, allow_special=True)`` is for template control markers only.
- :class:`StreamDecoder` emits only complete UTF-8 characters while streaming.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Iterable, Optional

from kimi_local.errors import UserError

PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

NUM_RESERVED_SPECIAL = 256
# tiktoken's regex engine degrades on very long uniform runs (tiktoken issue #195): split first.
_MAX_CHUNK = 400_000
_MAX_RUN = 25_000


class TokenizerError(UserError):
    pass


def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
    """``<base64 token bytes> <rank>`` per line; rank == token id."""
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    tok, rank = line.split()
                    ranks[base64.b64decode(tok, validate=True)] = int(rank)
                except ValueError:
                    raise TokenizerError(f"{path}: line {lineno} is not '<base64> <rank>'") from None
    except OSError as e:
        raise TokenizerError(f"{path}: cannot read ({e.strerror})") from None
    if not ranks:
        raise TokenizerError(f"{path}: empty tokenizer file")
    return ranks


def _split_runs(text: str) -> Iterable[str]:
    for i in range(0, len(text), _MAX_CHUNK):
        chunk = text[i: i + _MAX_CHUNK]
        start, cur_space, run = 0, None, 0
        for j, ch in enumerate(chunk):
            sp = ch.isspace()
            if sp != cur_space:
                cur_space, run = sp, 0
            run += 1
            if run > _MAX_RUN:
                yield chunk[start:j]
                start, run = j, 1
        yield chunk[start:]


class KimiTokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], name: str = "kimi"):
        import tiktoken

        self.n_base = len(mergeable_ranks)
        self.special_ids = dict(special_tokens)
        self.special_by_id = {i: s for s, i in special_tokens.items()}
        self._enc = tiktoken.Encoding(name=name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                      special_tokens=special_tokens)
        self.vocab_size = max([self.n_base - 1, *special_tokens.values()]) + 1
        self.eos_ids = [self.special_ids[t] for t in ("<|im_end|>", "[EOS]") if t in self.special_ids]
        self.bos_id = self.special_ids.get("[BOS]")

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "KimiTokenizer":
        model_path = os.path.join(model_dir, "tiktoken.model")
        if not os.path.isfile(model_path):
            raise TokenizerError(f"{model_dir}: no tiktoken.model")
        ranks = load_tiktoken_bpe(model_path)
        n_base = len(ranks)
        if sorted(ranks.values()) != list(range(n_base)):
            raise TokenizerError(f"{model_path}: ranks must be exactly 0..{n_base - 1}")
        specials: dict[str, int] = {}
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        if os.path.isfile(cfg_path):
            try:
                with open(cfg_path, "r", encoding="utf-8") as f:
                    cfg = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{cfg_path}: malformed JSON ({e})") from None
            decoder = cfg.get("added_tokens_decoder", {}) if isinstance(cfg, dict) else {}
            if not isinstance(decoder, dict):
                raise TokenizerError(f"{cfg_path}: 'added_tokens_decoder' must be an object")
            for k, v in decoder.items():
                try:
                    tid, content = int(k), v["content"]
                except (ValueError, TypeError, KeyError):
                    raise TokenizerError(f"{cfg_path}: added_tokens_decoder entry {k!r} needs an integer id and 'content'") from None
                if tid < n_base:
                    raise TokenizerError(f"{cfg_path}: special token {content!r} id {tid} collides with the base vocabulary (< {n_base})")
                specials[content] = tid
        # Unnamed ids in the reserved range are <|reserved_token_{id}|>, as in tokenization_kimi.py.
        named = set(specials.values())
        for tid in range(n_base, n_base + NUM_RESERVED_SPECIAL):
            if tid not in named:
                specials[f"<|reserved_token_{tid}|>"] = tid
        return cls(ranks, specials)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ``text`` (no BOS).  Special-token strings stay plain text unless allow_special."""
        out: list[int] = []
        for piece in _split_runs(text):
            if allow_special:
                out.extend(self._enc.encode(piece, allowed_special="all"))
            else:
                out.extend(self._enc.encode_ordinary(piece))
        return out

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        parts = []
        for i in ids:
            s = self.special_by_id.get(i)
            parts.append(s.encode("utf-8") if s is not None else self._enc.decode_single_token_bytes(i))
        return b"".join(parts)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens decode to their strings; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str) -> Optional[int]:
        return self.special_ids.get(token)

    def id_to_token(self, tid: int) -> str:
        s = self.special_by_id.get(tid)
        if s is not None:
            return s
        return self._enc.decode_single_token_bytes(tid).decode("utf-8", errors="replace")

    def is_special(self, tid: int) -> bool:
        return tid in self.special_by_id


class StreamDecoder:
    """Incremental detokenizer: ``push(id)`` returns only complete UTF-8 characters."""

    def __init__(self, tokenizer: KimiTokenizer):
        self.tok = tokenizer
        self.buf = b""

    def push(self, tid: int) -> str:
        self.buf += self.tok.decode_bytes([tid])
        # Emit the longest prefix that is valid UTF-8; keep an incomplete trailing sequence (<= 3 bytes).
        for cut in range(len(self.buf), max(len(self.buf) - 4, -1), -1):
            try:
                text = self.buf[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            rest = self.buf[cut:]
            if len(rest) < 4:
                self.buf = rest
                return text
            break
        # Genuinely invalid bytes (not just incomplete): replace them rather than stall forever.
        text = self.buf.decode("utf-8", errors="replace")
        self.buf = b""
        return text

    def flush(self) -> str:
        text = self.buf.decode("utf-8", errors="replace")
        self.buf = b""
        return text
