"""Build Hugging Face transformers' DeepseekV3ForCausalLM on the same (dequantised) weights.

transformers is a test/bench-only dependency: an independent implementation of the architecture to
check our logits against.
"""

import json
import os

import torch

from kimi_local.checkpoint import CheckpointReader
from kimi_local.fp8 import FP8BlockWeight


def load_hf_reference(model_dir: str, dtype=torch.float32):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "kimi_local_tiny", "auto_map")}
    cfg["model_type"] = "deepseek_v3"
    cfg["rope_interleave"] = True
    # Ask for the MTP layers to be dropped exactly as the HF config expects num_hidden_layers.
    config = DeepseekV3Config(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config).to(dtype).eval()

    reader = CheckpointReader(model_dir)
    block = tuple(json.load(open(os.path.join(model_dir, "config.json")))
                  .get("quantization_config", {}).get("weight_block_size", [128, 128]))

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
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if layer is not None and int(layer) >= L:
            continue  # MTP layer
        sd[name] = get(name)
    for layer in range(config.first_k_dense_replace, L):
        p = f"model.layers.{layer}.mlp.experts."
        gate_up = [torch.cat([get(f"{p}{e}.gate_proj.weight"), get(f"{p}{e}.up_proj.weight")], 0) for e in range(E)]
        sd[p + "gate_up_proj"] = torch.stack(gate_up)
        sd[p + "down_proj"] = torch.stack([get(f"{p}{e}.down_proj.weight") for e in range(E)])
    sd = {k: v.to(dtype) if not k.endswith("e_score_correction_bias") else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if "rotary_emb" not in m]
    assert not missing and not unexpected, (missing, unexpected)
    return model
