"""Kimi-K2 / DeepSeek-V3 forward pass in plain torch (device-agnostic, dtype selectable).

Shape legend: B batch, S new tokens, T cached+new tokens (keys), D hidden, H heads,
Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim, C kv_lora_rank, E routed experts, K experts/token.

Module and parameter names follow the Hugging Face checkpoint (``model.layers.3.self_attn.q_a_proj.weight``
...), so loading is a name-for-name copy.  Routed experts are *not* parameters of this module: every MoE
layer calls an injected :class:`RoutedExperts` object (token states + chosen expert ids + router weights ->
output), so the CPU kernels and the offload runtime replace the plain torch implementation below without
touching the model.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kimi_local.config import ModelArgs, yarn_get_mscale
from kimi_local.fp8 import FP8BlockWeight


# ----------------------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # Optional fast path, ``fast(x) -> tensor | None`` (None: not applicable).  The loader installs the
        # CPU kernel (kimi_local.cpu_kernels.norm) on CPU models; this module's code is its reference.
        self.fast = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast is not None:
            y = self.fast(x)
            if y is not None:
                return y
        # Variance in fp32 (as HF does): bf16 squares lose too much for 7168-wide rows.
        xf = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)   # x * rsqrt(mean(x^2) + eps), one op
        return self.weight * xf.to(x.dtype)


class Derived:
    """A value computed from a tensor (a dtype cast, a numpy copy...), kept until the tensor changes: a new
    storage, an in-place write (its version counter), another dtype or device, or another ``extra`` key."""

    def __init__(self):
        self._key = None
        self._value = None

    def get(self, t: torch.Tensor, make, extra=None):
        key = (t.data_ptr(), t._version, t.dtype, t.device, extra)
        if self._key != key:
            self._value, self._key = make(t), key
        return self._value


def linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)).  Used for the dense layer(s) and the shared expert."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.gate_proj = linear(dim, inter)
        self.up_proj = linear(dim, inter)
        self.down_proj = linear(inter, dim)
        self._gate_up: Optional[torch.Tensor] = None

    def fuse(self) -> None:
        """Store gate_proj and up_proj as the two halves of one [2I, D] weight (the parameters become views of
        it: no extra memory) so that a forward runs one matmul for both."""
        self._gate_up = fuse_weights(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = fused_weight(self._gate_up, self.gate_proj)
        if w is not None:
            g, u = F.linear(x, w).chunk(2, dim=-1)
            return self.down_proj(F.silu(g) * u)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def fuse_weights(*layers: nn.Linear) -> torch.Tensor:
    """Concatenate the weights of ``layers`` (same input size) into one tensor and make each layer's weight
    a view of its rows; returns the concatenation."""
    with torch.no_grad():
        w = torch.cat([m.weight.data for m in layers])
        r = 0
        for m in layers:
            n = m.weight.shape[0]
            m.weight.data = w[r: r + n]
            r += n
    return w


def fused_weight(w: Optional[torch.Tensor], first: nn.Linear) -> Optional[torch.Tensor]:
    """The fused weight while the layers still view it (moving or reassigning a weight silently un-fuses)."""
    if w is not None and first.weight.data_ptr() == w.data_ptr() and first.weight.device == w.device:
        return w
    return None


# ----------------------------------------------------------------------------------------- RoPE / YaRN

def rope_inv_freq(args: ModelArgs, device=None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [Dr/2] (YaRN-corrected when rope_scaling is yarn) and the cos/sin amplitude.

    YaRN is applied whenever configured, whatever context is allocated (as HF, vLLM and SGLang do).
    """
    dim, base = args.qk_rope_head_dim, args.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    rs = args.yarn
    if rs is None:
        return freqs, 1.0
    factor = float(rs["factor"])
    orig = float(rs["original_max_position_embeddings"])
    beta_fast = float(rs.get("beta_fast") or 32)
    beta_slow = float(rs.get("beta_slow") or 1)

    def corr_dim(n_rot: float) -> float:
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    freqs = freqs / factor * ramp + freqs * (1 - ramp)
    # cos/sin amplitude (1.0 for K2 and DeepSeek-V3, whose mscale == mscale_all_dim); rule as in HF.
    if rs.get("attention_factor") is not None:
        amp = float(rs["attention_factor"])
    elif rs.get("mscale") and rs.get("mscale_all_dim"):
        amp = yarn_get_mscale(factor, float(rs["mscale"])) / yarn_get_mscale(factor, float(rs["mscale_all_dim"]))
    else:
        amp = yarn_get_mscale(factor)
    return freqs, amp


def rope_rotation(inv_freq: torch.Tensor, amp: float, start_pos: int, S: int) -> torch.Tensor:
    """[S, Dr/2] complex rotations amp * e^{i pos * freq} for positions start_pos..start_pos+S-1."""
    pos = torch.arange(start_pos, start_pos + S, device=inv_freq.device, dtype=torch.float32)
    ang = torch.outer(pos, inv_freq)
    return torch.polar(torch.full_like(ang, amp), ang)


def apply_rope(x: torch.Tensor, rot: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rotate **interleaved pairs** (x[2i], x[2i+1]) by angle i — the layout of DeepSeek/Kimi checkpoints.

    x: [B, S, h, Dr]; rot: [S, Dr/2] complex64 (amplitude * e^{i angle}).  Each pair is read as the
    complex number x[2i] + i x[2i+1] and multiplied by rot.  A half-split (NeoX rotate_half) version
    would be silently wrong on these weights.  The result is in ``dtype`` (default: x's).
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))     # [B, S, h, Dr/2]
    return torch.view_as_real(xc * rot[None, :, None, :]).flatten(-2).to(dtype or x.dtype)


# ----------------------------------------------------------------------------------------- KV cache

@contextlib.contextmanager
def matmul_backend_for(device: torch.device, n_tokens: int):
    """On CPU, route a forward of a handful of tokens (decode) around oneDNN: its bf16 matmul is several
    times slower than ATen's own kernel for GEMVs, and much faster for many rows (prefill)."""
    was = torch._C._get_mkldnn_enabled()
    if device.type == "cpu" and n_tokens <= 8:
        torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(was)


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the attention core (scores, latent products): the activation dtype on accelerators,
    float32 on CPU, where batched bf16 matmuls run several times slower than float32 ones."""
    return torch.float32 if x.device.type == "cpu" else x.dtype


_last_mask: dict = {}


def causal_mask(start_pos: int, S: int, device) -> torch.Tensor:
    """[S, start_pos + S] float32 additive mask: query i sits at absolute position start_pos + i and sees keys
    0..start_pos + i (0), not the later ones (-inf).  Every layer of a forward asks for the same mask, so the
    last one built is kept (one entry, dropped at the end of the model's forward)."""
    key = (start_pos, S, str(device), torch.is_inference_mode_enabled())
    m = _last_mask.get(key)
    if m is None:
        m = torch.full((S, start_pos + S), float("-inf"), device=device).triu_(start_pos + 1)
        _last_mask.clear()
        _last_mask[key] = m
    return m


class KVCache:
    """Preallocated MLA latent cache: per layer, per position, the normalised latent c_kv [C] and the
    roped shared key k_pe [Dr] — 576 values per token per layer for K2, independent of head count.

    ``forward(tokens, start_pos, cache)`` writes positions start_pos..start_pos+S-1 and attends over
    [0, start_pos+S); anything beyond is stale and simply overwritten later, so rewinding the cache is
    just calling forward with a smaller start_pos.
    """

    def __init__(self, args: ModelArgs, max_len: int, batch: int = 1, device=None, dtype=torch.bfloat16):
        L = args.num_hidden_layers
        self.max_len = max_len
        self.batch = batch
        C = args.kv_lora_rank
        # One buffer, latent then rope key per position: the absorbed attention scores a query against both
        # with a single matmul.  kv / pe are views of it.
        self.kvpe = torch.zeros(L, batch, max_len, C + args.qk_rope_head_dim, device=device, dtype=dtype)
        self.kv = self.kvpe[..., :C]
        self.pe = self.kvpe[..., C:]

    @property
    def nbytes(self) -> int:
        return self.kvpe.numel() * self.kvpe.element_size()


# ----------------------------------------------------------------------------------------- attention

class MLA(nn.Module):
    """Multi-head latent attention with a naive form (prefill oracle) and an absorbed form (decode)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.num_attention_heads
        self.nope, self.rope, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora = args.kv_lora_rank
        self.q_lora = args.q_lora_rank
        qk = self.nope + self.rope
        if self.q_lora:
            self.q_a_proj = linear(args.hidden_size, self.q_lora)
            self.q_a_layernorm = RMSNorm(self.q_lora, args.rms_norm_eps)
            self.q_b_proj = linear(self.q_lora, self.n_heads * qk)
        else:
            self.q_proj = linear(args.hidden_size, self.n_heads * qk)
        self.kv_a_proj_with_mqa = linear(args.hidden_size, self.kv_lora + self.rope)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, args.rms_norm_eps)
        self.kv_b_proj = linear(self.kv_lora, self.n_heads * (self.nope + self.v_dim))
        self.o_proj = linear(self.n_heads * self.v_dim, args.hidden_size)
        self.softmax_scale = args.softmax_scale
        self._kv_b_cast = Derived()
        self._qkv_a: Optional[torch.Tensor] = None
        # Optional fast paths: ``fast(q, c_kv, k_pe, rot, cache, start_pos) -> [1, 1, H * Dv] | None`` (decode) and
        # ``fast.prefill(q_nope, q_pe, kvb, pe_all, start_pos) -> [1, S, H, Dv] | None`` (the naive form's causal
        # core).  The loader installs the CPU kernels (kimi_local.cpu_kernels.attention); the torch code below is
        # their reference.
        self.fast = None

    def fuse(self) -> None:
        """One matmul for q_a_proj and kv_a_proj_with_mqa (both read x): their weights become views of one."""
        if self.q_lora:
            self._qkv_a = fuse_weights(self.q_a_proj, self.kv_a_proj_with_mqa)

    def _kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """kv_b_proj's weight viewed per head [H, Dn + Dv, C], in the attention dtype (cast once, kept)."""
        w = self.kv_b_proj.weight
        if w.dtype != dtype:
            w = self._kv_b_cast.get(w, lambda t: t.detach().to(dtype), dtype)
        return w.view(self.n_heads, self.nope + self.v_dim, self.kv_lora)

    def forward(self, x: torch.Tensor, start_pos: int, rot: torch.Tensor,
                cache: Optional[KVCache], mode: str) -> torch.Tensor:
        B, S, _ = x.shape
        H = self.n_heads
        w_qkv = fused_weight(self._qkv_a, self.q_a_proj) if self.q_lora else None
        if w_qkv is not None:
            q_a, c_kv, k_pe = F.linear(x, w_qkv).split([self.q_lora, self.kv_lora, self.rope], dim=-1)
            q = self.q_b_proj(self.q_a_layernorm(q_a))
        else:
            if self.q_lora:
                q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            else:
                q = self.q_proj(x)
            c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora, self.rope], dim=-1)
        q = q.view(B, S, H, self.nope + self.rope)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)  # rope part is the *last* Dr of each head
        c_kv = self.kv_a_layernorm(c_kv)                               # [B, S, C]
        end = start_pos + S
        if self.fast is not None and S == 1 and (mode == "absorbed" or (mode == "auto" and end >= 4)):
            o = self.fast(q, c_kv, k_pe, rot, cache, start_pos)
            if o is not None:
                return self.o_proj(o.to(x.dtype))
        cd = attention_dtype(x)
        # one rotation for the H query heads and the shared key (as head H), straight into the attention dtype
        pe = apply_rope(torch.cat([q_pe, k_pe.unsqueeze(2)], dim=2), rot, cd)
        q_pe, k_pe = pe[:, :, :H], pe[:, :, H]                         # k_pe [B, S, Dr], shared by all heads
        if cache is not None:
            cache.kv[self.layer_id, :B, start_pos:end] = c_kv.to(cache.kv.dtype)
            cache.pe[self.layer_id, :B, start_pos:end] = k_pe.to(cache.pe.dtype)
            kvpe_all = cache.kvpe[self.layer_id, :B, :end].to(cd)         # [B, T, C + Dr]
            c_all, pe_all = kvpe_all[..., : self.kv_lora], kvpe_all[..., self.kv_lora:]
        else:
            c_all, pe_all = c_kv.to(cd), k_pe.to(cd)
            kvpe_all = None
        q_nope = q_nope.to(cd)
        T = end

        if mode == "auto":
            mode = "absorbed" if 4 * S <= T else "naive"
        wkv_b = self._kv_b_weight(cd)                                       # [H, Dn + Dv, C]
        if mode == "naive":
            # The softmax scale is folded into the queries (S x H x D values, not S x H x T scores), and the
            # rope part's scores use the single shared k_pe directly: q.k = q_nope.k_nope + q_pe.k_pe.
            # Keys are [k_nope, k_pe] with the one shared k_pe repeated per head, so one batched product scores
            # both parts, and the causal mask rides in as the product's initial value (baddbmm).
            Dq = self.nope + self.rope
            kvb = F.linear(c_all, wkv_b.flatten(0, 1)).view(B, T, H, -1)  # kv_b_proj: [B, T, H, Dn + Dv]
            o = self.fast.prefill(q_nope, q_pe, kvb, pe_all, start_pos) if self.fast is not None else None
            if o is None:
                mask = causal_mask(start_pos, S, x.device) if S > 1 else None   # [S, T]
                k_nope, v = kvb.split([self.nope, self.v_dim], dim=-1)
                k = torch.cat([k_nope, pe_all.unsqueeze(2).expand(B, T, H, self.rope)], dim=-1)  # [B, T, H, Dq]
                q = (torch.cat([q_nope, q_pe], dim=-1) * self.softmax_scale).transpose(1, 2).reshape(B * H, S, Dq)
                k = k.permute(0, 2, 3, 1).reshape(B * H, Dq, T)
                scores = torch.bmm(q, k) if mask is None else torch.baddbmm(mask.to(q.dtype), q, k)
                p = scores.float().softmax(dim=-1).to(cd)                   # [B*H, S, T]
                o = torch.bmm(p, v.permute(0, 2, 1, 3).reshape(B * H, T, self.v_dim))
                o = o.view(B, H, S, self.v_dim).transpose(1, 2)             # [B, S, H, Dv]
        elif mode == "absorbed":
            # Fold kv_b_proj into the query and the output: attention runs in the C-dim latent space, and
            # [q_lat, q_pe] . [c_kv, k_pe] scores latent and rope parts in one product per batch row.
            q_lat = torch.bmm(q_nope.transpose(0, 2).reshape(H, S * B, self.nope),
                              wkv_b[:, : self.nope])                                     # [H, S*B, C]
            q_lat = q_lat.view(H, S, B, self.kv_lora).permute(2, 1, 0, 3)                  # [B, S, H, C]
            q_cat = (torch.cat([q_lat, q_pe], dim=-1) * self.softmax_scale).reshape(B, S * H, -1)
            if kvpe_all is None:
                kvpe_all = torch.cat([c_all, pe_all], dim=-1)
            scores = torch.bmm(q_cat, kvpe_all.transpose(1, 2)).float()    # [B, S*H, T]
            mask = causal_mask(start_pos, S, x.device) if S > 1 else None   # [S, T]
            if mask is not None:
                scores = (scores.view(B, S, H, T) + mask[:, None, :]).view(B, S * H, T)
            p = scores.softmax(dim=-1).to(cd)
            o_lat = torch.bmm(p, c_all)                                      # [B, S*H, C]
            o_lat = o_lat.view(B * S, H, self.kv_lora).transpose(0, 1)     # [H, B*S, C]
            o = torch.bmm(o_lat, wkv_b[:, self.nope:].transpose(1, 2)).transpose(0, 1)   # [B*S, H, Dv]
        else:
            raise ValueError(f"unknown attention mode {mode!r}")
        o = o.to(x.dtype)
        return self.o_proj(o.reshape(B, S, H * self.v_dim))


# ----------------------------------------------------------------------------------------- MoE

class RoutedExperts(Protocol):
    """What every MoE layer calls for its routed experts.

    ``experts(layer_id, x[N, D], idx[N, K] long, weights[N, K] float32) -> [N, D]`` (x's dtype): for each
    token, sum over its K chosen experts of weight * down(silu(gate x) * up x).
    """

    def __call__(self, layer_id: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor: ...


class TorchRoutedExperts:
    """Plain torch routed experts: dequantize-then-matmul per chosen expert, in float32.

    The readable oracle for the CPU kernels and the offload runtime, and the ``torch`` backend.
    Weights stay in their checkpoint form (FP8 blocks, or dense tensors for unquantised checkpoints).
    """

    def __init__(self):
        self.layers: dict[int, dict[int, dict[str, object]]] = {}

    def add(self, layer_id: int, expert_id: int, proj: str, weight) -> None:
        if isinstance(weight, FP8BlockWeight) and weight.nan_codes():
            from kimi_local.checkpoint import CheckpointError   # the loader's error type (no import cycle at load)
            raise CheckpointError(f"model.layers.{layer_id}.mlp.experts.{expert_id}.{proj}.weight holds "
                                  f"{weight.nan_codes()} e4m3 NaN codes")
        self.layers.setdefault(layer_id, {}).setdefault(expert_id, {})[proj] = weight

    @staticmethod
    def _dense(w) -> torch.Tensor:
        return w.dequantize(torch.float32) if isinstance(w, FP8BlockWeight) else w.float()

    def __call__(self, layer_id: int, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        experts = self.layers[layer_id]
        xf = x.float()
        out = torch.zeros_like(xf)
        flat = idx.reshape(-1)
        for e in torch.unique(flat).tolist():
            tok, slot = torch.nonzero(idx == e, as_tuple=True)
            w = experts[e]
            h = xf[tok]
            a = F.silu(h @ self._dense(w["gate_proj"]).T) * (h @ self._dense(w["up_proj"]).T)
            y = a @ self._dense(w["down_proj"]).T
            out.index_add_(0, tok, y * weights[tok, slot, None].float())
        return out.to(x.dtype)


class Gate(nn.Module):
    """Router: fp32 logits, sigmoid (or softmax) scores, bias for *selection only*, group-limited top-k,
    normalisation and routed_scaling_factor."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size))
        self._w32 = Derived()
        if args.topk_method == "noaux_tc":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Optional fast paths, ``fast.logits(x) -> float32 logits | None`` and for the selection ``fast(scores) ->
        # (idx, w) | None``: the loader installs the CPU kernels (kimi_local.cpu_kernels.router) on CPU models; the
        # torch code below is their reference.
        self.fast = None

    def _weight_f32(self) -> torch.Tensor:
        """The router weight in float32 (converted once, kept while the weight is unchanged)."""
        w = self.weight
        return w if w.dtype == torch.float32 else self._w32.get(w, lambda t: t.detach().float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.args
        logits = self.fast.logits(x) if self.fast is not None else None
        if logits is None:
            logits = F.linear(x.float(), self._weight_f32())           # [N, E]; fp32: near-ties flip top-k
        scores = logits.sigmoid() if a.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        if self.fast is not None:
            picked = self.fast(scores)
            if picked is not None:
                return picked
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if a.n_group > 1 and a.topk_method in ("noaux_tc", "group_limited_greedy"):
            g = choice.view(-1, a.n_group, a.n_routed_experts // a.n_group)
            if a.topk_method == "noaux_tc":
                group_scores = g.topk(2, dim=-1)[0].sum(dim=-1)        # [N, G]: sum of each group's top-2
            else:
                group_scores = g.amax(dim=-1)
            keep = group_scores.topk(a.topk_group, dim=-1)[1]
            gmask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = g.masked_fill(gmask[..., None], float("-inf")).flatten(1)
        idx = choice.topk(a.num_experts_per_tok, dim=-1)[1]           # [N, K]
        w = scores.gather(1, idx)                                      # unbiased scores
        if a.num_experts_per_tok > 1 and a.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return idx, w * a.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, experts: RoutedExperts):
        super().__init__()
        self.layer_id = layer_id
        self.gate = Gate(args)
        self.shared_experts = (MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)
                               if args.n_shared_experts else None)
        # Plain attribute, not a submodule: the experts live outside the nn.Module tree.
        self.__dict__["experts"] = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])                                   # [N, D]
        idx, w = self.gate(h)
        submit = getattr(self.experts, "submit", None)
        if submit is not None:
            # An asynchronous expert store (the offload runtime) computes the routed experts on the CPU
            # while the shared expert runs here (on the GPU when there is one).
            finish = submit(self.layer_id, h, idx, w)
            shared = self.shared_experts(h) if self.shared_experts is not None else None
            y = finish()
            return (y if shared is None else y + shared).view(shape)
        y = self.experts(self.layer_id, h, idx, w)
        if self.shared_experts is not None:
            y = y + self.shared_experts(h)
        return y.view(shape)


# ----------------------------------------------------------------------------------------- the model

class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int, experts: RoutedExperts):
        super().__init__()
        self.self_attn = MLA(args, layer_id)
        self.mlp = MoE(args, layer_id, experts) if args.is_moe_layer(layer_id) else MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def forward(self, x, start_pos, rot, cache, mode):
        x = x + self.self_attn(self.input_layernorm(x), start_pos, rot, cache, mode)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Decoder(nn.Module):
    def __init__(self, args: ModelArgs, experts: RoutedExperts):
        super().__init__()
        # An explicit weight skips Embedding's random init, whose normal_() on the meta device imports
        # torch._dynamo (~1 s per load); the loader fills the weight anyway.
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size,
                                         _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.layers = nn.ModuleList(Block(args, i, experts) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class KimiModel(nn.Module):
    """The full causal LM.  ``forward(tokens[B, S], start_pos, cache) -> logits[B, S, V]`` (float32)."""

    def __init__(self, args: ModelArgs, experts: Optional[RoutedExperts] = None):
        super().__init__()
        self.args = args
        self.experts = experts if experts is not None else TorchRoutedExperts()
        self.model = _Decoder(args, self.experts)
        self.lm_head = linear(args.hidden_size, args.vocab_size)
        self.attn_mode = "auto"   # "naive" | "absorbed" | "auto" (absorbed when few new tokens)
        self._rope: dict = {}

    def fuse_projections(self) -> None:
        """Run projections that read the same input as one matmul each (q_a + kv_a; every SwiGLU's gate + up).
        Parameter names and values are unchanged (they become views of the fused weights); the loader calls
        this once the weights are in place."""
        for m in self.modules():
            if isinstance(m, (MLA, MLP)):
                m.fuse()

    def set_experts(self, experts: RoutedExperts) -> None:
        """Swap the routed-expert implementation (torch oracle, Numba kernels, offload runtime)."""
        self.experts = experts
        for layer in self.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.__dict__["experts"] = experts

    def new_cache(self, max_len: int, batch: int = 1) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.args, max_len, batch, device=p.device, dtype=attention_dtype(p))

    def _rotation(self, start_pos: int, S: int, device) -> torch.Tensor:
        """[S, Dr/2] complex rotations for positions start_pos..start_pos+S-1 (YaRN frequencies, amplitude),
        sliced from a per-device table that grows (doubling) to cover the positions asked for."""
        key = str(device)
        end = start_pos + S
        table = self._rope.get(key)
        if table is None or table.shape[0] < end:
            n = max(end, 2 * table.shape[0] if table is not None else 4096)
            table = self._rope[key] = rope_rotation(*rope_inv_freq(self.args, device), 0, n)
        return table[start_pos:end]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: Optional[KVCache] = None,
                last_only: bool = False) -> torch.Tensor:
        B, S = tokens.shape
        if cache is not None and start_pos + S > cache.max_len:
            raise ValueError(f"positions {start_pos}..{start_pos + S - 1} exceed the KV cache ({cache.max_len})")
        begin = getattr(self.experts, "begin_forward", None)
        if begin is not None:  # lets an expert store number positions for routing traces
            begin(start_pos, S)
        h = self.model.embed_tokens(tokens)
        rot = self._rotation(start_pos, S, h.device)
        with matmul_backend_for(h.device, B * S):
            try:
                for layer in self.model.layers:
                    h = layer(h, start_pos, rot, cache, self.attn_mode)
            finally:
                _last_mask.clear()   # a long prompt's mask is S x T floats: not kept past its forward
            if last_only:
                h = h[:, -1:]
            return self.lm_head(self.model.norm(h)).float()
