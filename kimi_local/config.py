"""Model configuration: one dataclass whose field names are config.json's keys.

Kimi-K2-Instruct (0711, 0905) and DeepSeek-V3 share the architecture, so one dataclass covers all of
them.  Unknown keys are ignored (checkpoints carry many); values this runtime cannot honour are
rejected at load time with the offending field named, never silently run wrong.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional


from kimi_local.errors import UserError


class ConfigError(UserError, ValueError):
    """A config.json that is malformed or asks for something this runtime does not support."""


@dataclass
class ModelArgs:
    # Sizes.  Defaults are Kimi-K2-Instruct 0711's; every real config.json overrides them.
    vocab_size: int = 163840
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 64
    num_key_value_heads: int = 64
    # MoE.
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    n_routed_experts: int = 384
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    routed_scaling_factor: float = 2.827
    norm_topk_prob: bool = True
    num_nextn_predict_layers: int = 0
    # MLA.
    q_lora_rank: Optional[int] = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # Positions and norms.
    rope_theta: float = 50000.0
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    # Tokens.
    bos_token_id: Optional[int] = 163584
    eos_token_id: Optional[int] = 163585
    pad_token_id: Optional[int] = None
    # Identity and storage.
    model_type: str = "kimi_k2"
    architectures: list = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    quantization_config: Optional[dict] = None
    torch_dtype: Optional[str] = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelArgs":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if "text_config" in d and isinstance(d["text_config"], dict) and "hidden_size" not in d:
            d = d["text_config"]  # K2.5-style nesting of the text backbone
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key in known:
                kwargs[key] = value
        args = cls(**kwargs)
        args._coerce_types(source)
        args.validate(source)
        return args

    @classmethod
    def from_model_dir(cls, model_dir: str) -> "ModelArgs":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no config.json in the model directory")
        try:
            with open(path, "r", encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: malformed JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ checks

    _INT_FIELDS = (
        "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "first_k_dense_replace", "moe_layer_freq",
        "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group",
        "num_nextn_predict_layers", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "max_position_embeddings",
    )
    _FLOAT_FIELDS = ("routed_scaling_factor", "rope_theta", "rms_norm_eps")

    def _coerce_types(self, source: str) -> None:
        for name in self._INT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    setattr(self, name, int(v))
                else:
                    raise ConfigError(f"{source}: field '{name}' must be an integer, got {v!r}")
        for name in self._FLOAT_FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"{source}: field '{name}' must be a number, got {v!r}")
            setattr(self, name, float(v))
        if self.q_lora_rank is not None and (isinstance(self.q_lora_rank, bool) or not isinstance(self.q_lora_rank, int)):
            raise ConfigError(f"{source}: field 'q_lora_rank' must be an integer or null, got {self.q_lora_rank!r}")
        if self.q_lora_rank == 0:
            self.q_lora_rank = None
        if self.n_routed_experts is None:
            raise ConfigError(f"{source}: field 'n_routed_experts' is required")

    def validate(self, source: str = "config.json") -> None:
        def bad(name: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field '{name}' = {getattr(self, name)!r}: {why}")

        for name in self._INT_FIELDS:
            v = getattr(self, name)
            if v < 0 or (v == 0 and name not in ("first_k_dense_replace", "num_nextn_predict_layers", "n_shared_experts")):
                raise bad(name, "must be positive")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise bad("topk_method", "supported: noaux_tc, greedy, group_limited_greedy")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise bad("scoring_func", "supported: sigmoid, softmax")
        if self.topk_method == "noaux_tc" and self.scoring_func != "sigmoid":
            raise bad("scoring_func", "noaux_tc routing requires sigmoid scoring")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "only silu (SwiGLU experts) is supported")
        if self.attention_bias:
            raise bad("attention_bias", "attention projections with bias are not supported")
        if self.tie_word_embeddings:
            raise bad("tie_word_embeddings", "DeepSeek-V3/Kimi-K2 use separate embed_tokens and lm_head")
        if self.num_key_value_heads != self.num_attention_heads:
            raise bad("num_key_value_heads", "MLA checkpoints have num_key_value_heads == num_attention_heads")
        if self.n_routed_experts % self.n_group != 0:
            raise bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            raise bad("topk_group", f"must be <= n_group ({self.n_group})")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be <= n_routed_experts ({self.n_routed_experts})")
        if self.n_group > 1 and self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            raise bad("num_experts_per_tok", "more experts per token than the kept groups hold")
        if self.moe_layer_freq != 1:
            raise bad("moe_layer_freq", "only 1 (every layer after first_k_dense_replace is MoE) is supported")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise bad("first_k_dense_replace", f"exceeds num_hidden_layers ({self.num_hidden_layers})")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even")
        rs = self.rope_scaling
        if rs is not None:
            if not isinstance(rs, dict):
                raise bad("rope_scaling", "must be an object or null")
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise bad("rope_scaling", f"rope_scaling.type {kind!r} is not supported (yarn only)")
            if kind == "yarn":
                for k in ("factor", "original_max_position_embeddings"):
                    if not isinstance(rs.get(k), (int, float)) or isinstance(rs.get(k), bool) or rs.get(k) <= 0:
                        raise bad("rope_scaling", f"rope_scaling.{k} must be a positive number")
        qc = self.quantization_config
        if qc is not None:
            if not isinstance(qc, dict):
                raise bad("quantization_config", "must be an object")
            method = qc.get("quant_method")
            if method != "fp8":
                raise bad("quantization_config",
                          f"quant_method {method!r} is not supported (block fp8 checkpoints only; "
                          "INT4 compressed-tensors checkpoints such as K2-Thinking are not yet supported)")
            if qc.get("fmt", "e4m3") != "e4m3":
                raise bad("quantization_config", f"fmt {qc.get('fmt')!r} is not supported (e4m3 only)")
            wbs = qc.get("weight_block_size", [128, 128])
            if (not isinstance(wbs, (list, tuple)) or len(wbs) != 2
                    or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in wbs)):
                raise bad("quantization_config", "weight_block_size must be two positive integers")

    # ------------------------------------------------------------------ derived values

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def weight_block_size(self) -> tuple[int, int]:
        qc = self.quantization_config or {}
        b = qc.get("weight_block_size", [128, 128])
        return int(b[0]), int(b[1])

    @property
    def is_fp8(self) -> bool:
        return bool(self.quantization_config) and self.quantization_config.get("quant_method") == "fp8"

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def yarn(self) -> Optional[dict]:
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            return rs
        return None

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 whenever YaRN scaling is configured (always, like HF/vLLM)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.yarn
        if rs is not None:
            mscale = yarn_get_mscale(float(rs["factor"]), float(rs.get("mscale_all_dim", 0.0) or 0.0))
            scale = scale * mscale * mscale
        return scale

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return list(e) if isinstance(e, (list, tuple)) else [int(e)]


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0
