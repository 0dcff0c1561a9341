"""Independent reference: our float32 logits == Hugging Face transformers' DeepseekV3ForCausalLM on the
same dequantised weights, for K2 0711-style, 0905-style (YaRN factor 64) and DeepSeek-V3-style
(n_group > 1, MTP layer on disk) tiny models, on texts longer than original_max_position_embeddings: whole
prompts in both attention forms, and token-by-token decoding through the KV cache."""

import pytest
import torch

pytest.importorskip("transformers")

from kimi_local.checkpoint import load_model
from kimi_local.tiny import ensure_tiny
from kimi_local.tokenizer import KimiTokenizer

from kimi_local.bench.hf_compare import load_hf_reference

TEXT = (
    "Once upon a time, in a small town near the mountains, there lived a young engineer who loved to "
    "build machines. Every morning she walked to her workshop and listened to the birds. 人工智能是计算机"
    "科学的一个分支。def f(x):\n    return x * 2\n"
)


@pytest.mark.parametrize("variant", ["k2-0711", "k2-0905", "deepseek-v3"])
def test_logits_match_transformers(variant):
    d = ensure_tiny(seed=1, variant=variant)
    tok = KimiTokenizer.from_model_dir(d)
    ids = tok.encode(TEXT)
    orig = __import__("json").load(open(d + "/config.json"))["rope_scaling"]["original_max_position_embeddings"]
    assert len(ids) > orig, "the text must be longer than original_max_position_embeddings"
    x = torch.tensor([ids])
    ours = load_model(d, dtype=torch.float32, expert_backend="torch")
    ref = load_hf_reference(d)
    with torch.no_grad():
        theirs = ref(x).logits.float()
    for mode in ("naive", "absorbed"):
        ours.attn_mode = mode
        mine = ours(x)
        err = (mine - theirs).abs().max().item()
        scale = theirs.abs().max().item()
        assert err < 1e-4 * max(1.0, scale), f"{variant}/{mode}: max |diff| {err}"
        assert torch.equal(mine.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("variant", ["k2-0711", "deepseek-v3"])
def test_cached_decode_matches_transformers(variant):
    """Prefill a prefix, then feed the rest one token at a time through the KV cache (the CPU decode-attention
    and router kernels, as a user's generation runs): every step's logits equal HF's full-sequence ones."""
    d = ensure_tiny(seed=1, variant=variant)
    ids = KimiTokenizer.from_model_dir(d).encode(TEXT)
    ours = load_model(d, dtype=torch.float32, expert_backend="torch")
    assert all(m.fast is not None for m in ours.modules() if type(m).__name__ in ("MLA", "Gate"))
    with torch.no_grad():
        theirs = load_hf_reference(d)(torch.tensor([ids])).logits.float()[0]
    n0 = 9
    cache = ours.new_cache(len(ids))
    rows = [ours(torch.tensor([ids[:n0]]), 0, cache)[0, -1]]
    for pos in range(n0, len(ids)):
        rows.append(ours(torch.tensor([[ids[pos]]]), pos, cache)[0, -1])
    mine = torch.stack(rows)
    want = theirs[n0 - 1:]
    scale = want.abs().max().item()
    assert (mine - want).abs().max().item() < 1e-4 * max(1.0, scale)
    assert torch.equal(mine.argmax(-1), want.argmax(-1))
