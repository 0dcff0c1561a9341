"""The same tiny model through Hugging Face transformers' DeepseekV3 (an optional bench dependency).

:func:`load_hf_reference` builds ``DeepseekV3ForCausalLM`` on the checkpoint's dequantised weights (the
independent implementation our logits are checked against); :func:`compare` times it against our engine on
the same prompts, thread count and dtype, and reports ours / theirs ratios:

* prefill: one forward pass over the prompt (HF with its ``DynamicCache``, logits of the last position only,
  as ``generate`` does; ours through ``Engine.generate``'s prefill);
* decode: greedy ``generate`` (HF's own loop and KV cache) vs ``Engine.generate``, both timed per token by
  timestamps of the tokens as they come out (HF through a streamer, ours per yielded chunk), from the first
  generated token to the last, so prefill and the first sampling are excluded on both sides.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from kimi_local.checkpoint import CheckpointReader
from kimi_local.fp8 import FP8BlockWeight


def hf_available() -> Optional[str]:
    """None when transformers' DeepseekV3 can be imported, else the reason it cannot."""
    try:
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return f"transformers DeepseekV3 unavailable ({type(e).__name__}: {e}); pip install 'kimi-local[bench]'"
    return None


def load_hf_reference(model_dir: str, dtype=torch.float32, attn_implementation: Optional[str] = "eager",
                      experts_implementation: Optional[str] = None):
    """``DeepseekV3ForCausalLM`` on the same (dequantised) weights as our model.

    ``attn_implementation`` / ``experts_implementation``: None = transformers' default choice (what a user
    gets); "eager" attention is the bit-faithful reference for logits comparisons.
    """
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    block = tuple(raw.get("quantization_config", {}).get("weight_block_size", [128, 128]))
    cfg = {k: v for k, v in raw.items() if k not in ("quantization_config", "kimi_local_tiny", "auto_map")}
    cfg["model_type"] = "deepseek_v3"
    cfg["rope_interleave"] = True   # DeepSeek/Kimi checkpoints rotate interleaved pairs
    kw = {}
    if attn_implementation is not None:
        kw["attn_implementation"] = attn_implementation
    if experts_implementation is not None:
        kw["experts_implementation"] = experts_implementation
    config = DeepseekV3Config(**cfg, **kw)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).to(dtype)

    reader = CheckpointReader(model_dir)

    def get(name):
        t = reader.get(name)
        if name + "_scale_inv" in reader.tensors:
            return FP8BlockWeight(t, reader.get(name + "_scale_inv").float(), block).dequantize(torch.float32)
        return t.float()

    sd = {}
    E, L = config.n_routed_experts, config.num_hidden_layers
    for name in reader.tensors:
        if name.endswith("_scale_inv") or ".mlp.experts." in name:
            continue
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= L:
            continue  # multi-token-prediction layer: unused at inference
        sd[name] = get(name)
    for layer in range(config.first_k_dense_replace, L):
        p = f"model.layers.{layer}.mlp.experts."
        I, D = config.moe_intermediate_size, config.hidden_size
        # Filled in place (torch.stack over hundreds of experts is needlessly slow).
        gu = torch.empty(E, 2 * I, D, dtype=dtype)
        dn = torch.empty(E, D, I, dtype=dtype)
        for e in range(E):
            gu[e, :I] = get(f"{p}{e}.gate_proj.weight")
            gu[e, I:] = get(f"{p}{e}.up_proj.weight")
            dn[e] = get(f"{p}{e}.down_proj.weight")
        sd[p + "gate_up_proj"] = gu
        sd[p + "down_proj"] = dn
    reader.close()
    sd = {k: (v if k.endswith("e_score_correction_bias") else v.to(dtype)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    if missing or unexpected:
        raise RuntimeError(f"HF state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


class _Stamps:
    """A transformers streamer that records when each generated token comes out."""

    def __init__(self):
        self.times: list[float] = []
        self._first = True

    def put(self, value) -> None:
        if self._first:       # generate() first puts the prompt
            self._first = False
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def hf_prefill_seconds(model, prompt: list[int]) -> float:
    x = torch.tensor([prompt], dtype=torch.long, device=model.device)
    with torch.inference_mode():
        _sync(model)
        t0 = time.perf_counter()
        model(input_ids=x, use_cache=True, logits_to_keep=1)
        _sync(model)
        return time.perf_counter() - t0


def hf_decode(model, prompt: list[int], n_new: int) -> tuple[float, list[int]]:
    """(decode seconds per token, generated ids) for a greedy generate of ``n_new`` tokens."""
    x = torch.tensor([prompt], dtype=torch.long, device=model.device)
    st = _Stamps()
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n_new,
                             min_new_tokens=n_new, do_sample=False, streamer=st, pad_token_id=0,
                             eos_token_id=None)
    ids = out[0, len(prompt):].tolist()
    t = st.times
    per_tok = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else float("nan")
    return per_tok, ids


def ours_prefill_seconds(engine, prompt: list[int]) -> float:
    from kimi_local.sampling import SamplingParams
    engine.reset()
    gen = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1, stop_token_ids=[]))
    timings = None
    for ch in gen:
        if ch.timings is not None:
            timings = ch.timings
    return timings.prefill_seconds


def ours_decode(engine, prompt: list[int], n_new: int) -> tuple[float, list[int], object]:
    """(seconds per token between the first and the last generated token, ids, engine timings)."""
    from kimi_local.sampling import SamplingParams
    engine.reset()
    stamps, ids, timings = [], [], None
    for ch in engine.generate(prompt, SamplingParams(temperature=0, max_tokens=n_new, stop_token_ids=[])):
        stamps.append(time.perf_counter())
        ids.extend(ch.token_ids)
        if ch.timings is not None:
            timings = ch.timings
    # The final chunk of a max_tokens stop carries the last token; every chunk is one token.
    per_tok = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return per_tok, ids, timings


def compare(engine, model_dir: str, dtype: torch.dtype, threads: int, *, prefill_len: int, decode_ctx: int,
            n_new: int, repeats: int, seed: int = 0, log=print) -> dict:
    """Ours vs HF on the same prompts/threads/dtype: ratios ours/theirs (higher = we are faster)."""
    reason = hf_available()
    if reason is not None:
        return {"available": False, "reason": reason, "prefill_ratio": None, "decode_ratio": None}
    import transformers

    from kimi_local.bench.prompts import random_prompt

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    hf = load_hf_reference(model_dir, dtype=dtype, attn_implementation=None, experts_implementation=None)
    hf = hf.to(engine._device)   # same device as our attention (cpu unless --device says otherwise)
    hf_load = time.perf_counter() - t0
    torch.set_num_threads(threads)
    vocab = engine._n_vocab
    p_prompt = random_prompt(prefill_len, vocab, seed)
    d_prompt = random_prompt(max(1, decode_ctx), vocab, seed + 1)

    # Warm both (allocator, lazy init), then alternate ours/theirs so drifting machine load hits both.
    hf_prefill_seconds(hf, p_prompt[:16])
    ours_prefill_seconds(engine, p_prompt[:16])
    hp, op, hd, od = [], [], [], []
    ids_ours = ids_hf = None
    for _ in range(repeats):
        op.append(ours_prefill_seconds(engine, p_prompt))
        hp.append(hf_prefill_seconds(hf, p_prompt))
        t, ids_ours, _ = ours_decode(engine, d_prompt, n_new)
        od.append(t)
        t, ids_hf = hf_decode(hf, d_prompt, n_new)
        hd.append(t)
    engine.reset()
    ours_p, hf_p, ours_d, hf_d = min(op), min(hp), min(od), min(hd)
    same = sum(1 for a, b in zip(ids_ours, ids_hf) if a == b) if ids_ours and ids_hf else 0
    first_diff = next((i for i, (a, b) in enumerate(zip(ids_ours, ids_hf)) if a != b), None)
    res = {
        "available": True,
        "transformers_version": transformers.__version__,
        "hf_attn_implementation": hf.config._attn_implementation,
        "hf_experts_implementation": getattr(hf.config, "_experts_implementation", None),
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(engine._device),
        "threads": threads,
        "hf_load_seconds": hf_load,
        "prefill_tokens": len(p_prompt),
        "decode_context": len(d_prompt),
        "decode_new_tokens": n_new,
        "repeats": repeats,
        "ours_prefill_tok_s": len(p_prompt) / ours_p,
        "hf_prefill_tok_s": len(p_prompt) / hf_p,
        "ours_decode_tok_s": 1.0 / ours_d,
        "hf_decode_tok_s": 1.0 / hf_d,
        "prefill_ratio": hf_p / ours_p,
        "decode_ratio": hf_d / ours_d,
        "greedy_tokens_identical_prefix": first_diff if first_diff is not None else min(len(ids_ours), len(ids_hf)),
        "greedy_tokens_equal": same,
    }
    del hf
    return res
