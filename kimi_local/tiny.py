"""Tiny random-weight models in the exact Kimi-K2 on-disk format (``kimi-local make-tiny``).

A tiny model directory has everything a real Kimi-K2-Instruct download has: ``config.json`` (model_type
kimi_k2, DeepseekV3ForCausalLM, fp8/e4m3/[128,128] quantization_config, YaRN rope_scaling with a small
original_max_position_embeddings so YaRN is active on short texts), several safetensors shards with an
index (one layer split across shards), FP8 weights quantised from a random init with correct block
scales, ``tiktoken.model`` (a small byte-level BPE learned from a bundled text), ``tokenizer_config.json``
with the K2 special tokens at the K2 offsets after the base vocabulary, and ``chat_template.jinja``.

The structure mirrors K2: a dense first layer, 384 routed experts, top-8, one shared expert, sigmoid +
noaux_tc routing; widths are small and some are not multiples of 128 (partial FP8 blocks).  The same
seed always gives the same bytes.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import shutil
import tempfile
from importlib import resources
from typing import Optional

import torch

from kimi_local.fp8 import quantize
from kimi_local.tokenizer import PAT_STR

FORMAT_VERSION = 1   # bump when the tiny model's layout changes, so caches rebuild

# K2 special tokens and their offsets from the first special id (163584 in the real model).
K2_SPECIALS = {
    "[BOS]": 0, "[EOS]": 1, "<|im_end|>": 2, "<|im_user|>": 3, "<|im_assistant|>": 4,
    "<|start_header_id|>": 6, "<|end_header_id|>": 7, "[EOT]": 9, "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11, "<|tool_calls_section_end|>": 12, "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14, "<|tool_call_end|>": 15, "<|im_middle|>": 17,
    "[UNK]": 254, "[PAD]": 255,
}
N_SPECIAL = 256

_BASE = dict(
    hidden_size=192, intermediate_size=384, moe_intermediate_size=160, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, moe_layer_freq=1,
    n_routed_experts=384, n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
    topk_method="noaux_tc", scoring_func="sigmoid", routed_scaling_factor=2.827, norm_topk_prob=True,
    num_nextn_predict_layers=0, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
    v_head_dim=32, rope_theta=50000.0, rms_norm_eps=1e-6, hidden_act="silu", attention_bias=False,
    tie_word_embeddings=False, model_type="kimi_k2", architectures=["DeepseekV3ForCausalLM"],
    torch_dtype="bfloat16",
    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                         "weight_block_size": [128, 128]},
)

# Config variants mirroring the real checkpoints (sizes shrunk).
VARIANTS: dict[str, dict] = {
    "k2-0711": dict(max_position_embeddings=2048,
                    rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 64,
                                  "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "k2-0905": dict(max_position_embeddings=4096, rms_norm_eps=1e-5,
                    rope_scaling={"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 64,
                                  "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "deepseek-v3": dict(model_type="deepseek_v3", n_routed_experts=256, n_group=8, topk_group=4,
                        routed_scaling_factor=2.5, rope_theta=10000.0, num_nextn_predict_layers=1,
                        max_position_embeddings=2048,
                        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
                                      "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


# ----------------------------------------------------------------------------------------- tokenizer

def _corpus() -> str:
    return resources.files("kimi_local").joinpath("data/tiny_corpus.txt").read_text(encoding="utf-8")


def train_bpe(text: str, n_merges: int) -> dict[bytes, int]:
    """Byte-level BPE with tiktoken semantics: ranks 0..255 are the bytes, each merge gets the next rank.

    Words come from Kimi's pre-tokenizer regex; ties are broken by the smaller pair so training is
    deterministic.  Stops early when no pair occurs twice.
    """
    import regex

    pat = regex.compile(PAT_STR, flags=regex.V1)
    counts = collections.Counter(m.group(0).encode("utf-8") for m in pat.finditer(text))
    words = [[bytes([b]) for b in w] for w in counts]
    freqs = list(counts.values())
    ranks = {bytes([i]): i for i in range(256)}
    for _ in range(n_merges):
        pairs: collections.Counter = collections.Counter()
        for w, f in zip(words, freqs):
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if best[1] < 2:
            break
        (a, b), _ = best
        merged = a + b
        if merged in ranks:
            continue
        ranks[merged] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i: i + 2] = [merged]
                i += 1
    return ranks


def write_tokenizer(out_dir: str, n_merges: int = 512) -> int:
    """Write tiktoken.model + tokenizer_config.json; return the base vocabulary size."""
    ranks = train_bpe(_corpus(), n_merges)
    with open(os.path.join(out_dir, "tiktoken.model"), "w", encoding="ascii") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode('ascii')} {rank}\n")
    n_base = len(ranks)
    decoder = {str(n_base + off): {"content": name, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}
               for name, off in sorted(K2_SPECIALS.items(), key=lambda kv: kv[1])}
    cfg = {
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|start_header_id|>",
                                      "<|end_header_id|>", "[EOT]", "<|im_system|>", "<|im_middle|>"],
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "TikTokenTokenizer",
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return n_base


# ----------------------------------------------------------------------------------------- weights

def _tensors(cfg: dict, seed: int):
    """Yield (name, tensor) in HF order; FP8 linears come as weight + weight_scale_inv."""
    g = torch.Generator().manual_seed(seed)
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    H, dn, dr, dv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    C, Q = cfg["kv_lora_rank"], cfg["q_lora_rank"]
    I, Im, E = cfg["intermediate_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    n_layers = cfg["num_hidden_layers"] + cfg["num_nextn_predict_layers"]

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    def fp8(name, out_f, in_f):
        q = quantize(randn(out_f, in_f, std=in_f ** -0.5))
        yield name, q.q
        yield name + "_scale_inv", q.scale_inv

    def norm(name, dim):
        yield name, (1.0 + 0.1 * randn(dim)).to(torch.bfloat16)

    yield "model.embed_tokens.weight", randn(V, D).to(torch.bfloat16)
    for L in range(n_layers):
        p = f"model.layers.{L}."
        if L >= cfg["num_hidden_layers"]:
            # A multi-token-prediction layer as DeepSeek-V3 ships it: present on disk, unused at inference.
            yield from norm(p + "enorm.weight", D)
            yield from norm(p + "hnorm.weight", D)
            yield from fp8(p + "eh_proj.weight", D, 2 * D)
            continue
        yield from norm(p + "input_layernorm.weight", D)
        yield from fp8(p + "self_attn.q_a_proj.weight", Q, D)
        yield from norm(p + "self_attn.q_a_layernorm.weight", Q)
        yield from fp8(p + "self_attn.q_b_proj.weight", H * (dn + dr), Q)
        yield from fp8(p + "self_attn.kv_a_proj_with_mqa.weight", C + dr, D)
        yield from norm(p + "self_attn.kv_a_layernorm.weight", C)
        yield from fp8(p + "self_attn.kv_b_proj.weight", H * (dn + dv), C)
        yield from fp8(p + "self_attn.o_proj.weight", D, H * dv)
        yield from norm(p + "post_attention_layernorm.weight", D)
        if L < cfg["first_k_dense_replace"]:
            yield from fp8(p + "mlp.gate_proj.weight", I, D)
            yield from fp8(p + "mlp.up_proj.weight", I, D)
            yield from fp8(p + "mlp.down_proj.weight", D, I)
        else:
            # Router logits with a spread wide enough that top-8 choices are not near-ties.
            yield p + "mlp.gate.weight", randn(E, D, std=2.0 * D ** -0.5).to(torch.bfloat16)
            yield p + "mlp.gate.e_score_correction_bias", randn(E, std=0.05).float()
            for e in range(E):
                yield from fp8(p + f"mlp.experts.{e}.gate_proj.weight", Im, D)
                yield from fp8(p + f"mlp.experts.{e}.up_proj.weight", Im, D)
                yield from fp8(p + f"mlp.experts.{e}.down_proj.weight", D, Im)
            ns = Im * cfg["n_shared_experts"]
            yield from fp8(p + "mlp.shared_experts.gate_proj.weight", ns, D)
            yield from fp8(p + "mlp.shared_experts.up_proj.weight", ns, D)
            yield from fp8(p + "mlp.shared_experts.down_proj.weight", D, ns)
    yield from norm("model.norm.weight", D)
    yield "lm_head.weight", randn(V, D, std=D ** -0.5).to(torch.bfloat16)


def _write_shards(out_dir: str, tensors, n_shards: int) -> None:
    from safetensors.torch import save_file

    items = [(n, t.contiguous()) for n, t in tensors]
    total = sum(t.numel() * t.element_size() for _, t in items)
    per = total / n_shards
    shards: list[list] = [[]]
    size = 0
    for n, t in items:
        # Cut purely by size: shard boundaries fall inside a layer (as in real checkpoints).
        if size >= per * len(shards) and len(shards) < n_shards:
            shards.append([])
        shards[-1].append((n, t))
        size += t.numel() * t.element_size()
    weight_map = {}
    for i, group in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(dict(group), os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n, _ in group:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def make_tiny(out_dir: str, seed: int = 0, variant: str = "k2-0711", n_shards: int = 3,
              overrides: Optional[dict] = None) -> str:
    """Write a complete tiny model directory to ``out_dir``.

    ``overrides`` replaces config values (e.g. fewer experts for fast loader tests).
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}; choose from {', '.join(VARIANTS)}")
    os.makedirs(out_dir, exist_ok=True)
    n_base = write_tokenizer(out_dir)
    cfg = dict(_BASE)
    cfg.update(VARIANTS[variant])
    cfg.update(overrides or {})
    cfg["vocab_size"] = n_base + N_SPECIAL
    cfg["bos_token_id"] = n_base + K2_SPECIALS["[BOS]"]
    cfg["eos_token_id"] = n_base + K2_SPECIALS["[EOS]"]
    cfg["pad_token_id"] = n_base + K2_SPECIALS["[PAD]"]
    cfg["kimi_local_tiny"] = {"seed": seed, "variant": variant, "format_version": FORMAT_VERSION}
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
    _write_shards(out_dir, _tensors(cfg, seed), n_shards)
    template = resources.files("kimi_local").joinpath("data/chat_template.jinja").read_text(encoding="utf-8")
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(template)
    return out_dir


def cache_root() -> str:
    return os.environ.get("KIMI_LOCAL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kimi-local")


def build_cached(path: str, build) -> str:
    """``path`` if it already holds a model, else ``build(tmp_dir)`` and rename the result into place.

    Built in a temporary directory beside it, so a crash or a concurrent build never leaves a
    half-written model where a complete one is expected.
    """
    if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
        return path
    root = os.path.dirname(path)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".building-", dir=root)
    try:
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def ensure_tiny(seed: int = 0, variant: str = "k2-0711", root: Optional[str] = None) -> str:
    """Path of the cached tiny model for (seed, variant), building it first if absent."""
    path = os.path.join(root or cache_root(), f"tiny-{variant}-seed{seed}-v{FORMAT_VERSION}")
    return build_cached(path, lambda d: make_tiny(d, seed=seed, variant=variant))
