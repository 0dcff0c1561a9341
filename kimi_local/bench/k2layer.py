"""``kimi-local bench k2-layer``: one full-size Kimi-K2 MoE layer on this machine, and what it implies.

1. Routed experts: ``n`` synthetic full-size experts (hidden 7168, moe_intermediate 2048, FP8 e4m3 with
   128x128 float32 scales; 44,050,944 bytes each) -- as many of K2's 384 as RAM allows -- held by the real
   expert backend (:class:`~kimi_local.offload.host_experts.NumbaRoutedExperts`, packed through
   ``PackedExperts``) and called exactly as a MoE layer calls it (torch activations in, torch out).
   * decode: 1 token x 8 distinct experts per call, calls cycling through random permutations of all ``n``
     experts (every expert is used; nothing is re-read from cache between uses);
   * prefill: what a 512-token prompt gives one layer: 8 experts per token with every expert receiving
     ~512*8/384 = 10.7 tokens, here 512*n/384 tokens over the ``n`` experts present.
   The DRAM read ceiling (kimi_local.cpu_kernels.membw) is measured in the same run.
2. Non-routed work of one layer at full size (MLA attention, router, shared expert; bf16 as the loader keeps
   them), measured on the CPU -- and on the GPU when one is present -- for decode (1 token at a context) and
   prefill (512 tokens).
3. The projection for the whole model (61 layers: 1 dense + 60 MoE, plus lm_head), every figure with its formula
   and inputs, and a what-if table for other DRAM bandwidths and GPUs (assumptions stated in the JSON).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional

import numpy as np
import torch

K2_HIDDEN, K2_INTER, K2_EXPERTS, TOPK = 7168, 2048, 384, 8
K2_LAYERS, K2_MOE_LAYERS = 61, 60
PROMPT = 512   # prefill projection: a 512-token prompt

# What-if GPUs.  Spec-sheet figures; efficiencies and overheads are assumptions, stated in the output.
GPU_SPECS = {
    "h100": {"name": "NVIDIA H100 SXM 80GB", "memory_gb": 80, "hbm_gbps": 3350.0, "bf16_tflops": 989.0,
             "pcie_gbps": 50.0},
    "4090": {"name": "NVIDIA RTX 4090 24GB", "memory_gb": 24, "hbm_gbps": 1008.0, "bf16_tflops": 165.0,
             "pcie_gbps": 25.0},
}
GPU_ASSUMPTIONS = {
    "hbm_efficiency": 0.7,            # achieved fraction of HBM bandwidth for the bf16 GEMVs of decode
    "flops_efficiency": 0.4,          # achieved fraction of dense bf16 tensor FLOP/s in prefill GEMMs
    "per_layer_overhead_s": 150e-6,   # eager-torch kernel launches and syncs per transformer layer (decode)
    "per_moe_layer_roundtrip_s": 50e-6,  # hidden state GPU -> CPU experts -> GPU: sync + 2 small copies
    "routed_experts_on": "cpu",       # no GPU expert cache assumed: every routed expert computed from host RAM
}


# ============================================================================================ sizes
def k2_args(**over):
    from kimi_local.config import ModelArgs
    d = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}}
    d.update(over)
    return ModelArgs.from_dict(d)


def k2_expert_nbytes() -> int:
    from kimi_local.bench.e2e import expert_nbytes
    return expert_nbytes(k2_args())


def k2_nonrouted_params(args=None) -> dict:
    """Parameter counts of K2's non-routed weights, by group (bf16 bytes = 2x)."""
    a = args or k2_args()
    D, H = a.hidden_size, a.num_attention_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    attn = (D * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * H * qk + D * (a.kv_lora_rank + a.qk_rope_head_dim)
            + a.kv_lora_rank + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) + H * a.v_head_dim * D + 2 * D)
    shared = 3 * D * a.moe_intermediate_size * a.n_shared_experts
    router = a.n_routed_experts * D
    dense = 3 * D * a.intermediate_size
    return {"attention_per_layer": attn, "shared_expert_per_moe_layer": shared, "router_per_moe_layer": router,
            "dense_mlp_per_dense_layer": dense, "lm_head": a.vocab_size * D, "embedding_row": D,
            "layers": a.num_hidden_layers, "moe_layers": len(a.moe_layer_ids),
            "dense_layers": a.num_hidden_layers - len(a.moe_layer_ids)}


def k2_nonrouted_bytes_per_token(dtype_bytes: int = 2) -> dict:
    p = k2_nonrouted_params()
    b = {
        "attention": p["attention_per_layer"] * p["layers"] * dtype_bytes,
        "router": p["router_per_moe_layer"] * p["moe_layers"] * dtype_bytes,
        "shared_experts": p["shared_expert_per_moe_layer"] * p["moe_layers"] * dtype_bytes,
        "dense_mlp": p["dense_mlp_per_dense_layer"] * p["dense_layers"] * dtype_bytes,
        "lm_head": p["lm_head"] * dtype_bytes,
        "embedding_row": p["embedding_row"] * dtype_bytes,
    }
    b["total"] = sum(b.values())
    return b


def default_expert_count(avail_bytes: int, bpe: int, reserve: int) -> int:
    """As many of the 384 experts as 40% of the available RAM (less ``reserve``) holds; at least 8."""
    return int(max(TOPK, min(K2_EXPERTS, (0.4 * avail_bytes - reserve) // bpe)))


# ============================================================================================ routed experts
def build_experts(n: int, hidden: int = K2_HIDDEN, inter: int = K2_INTER, seed: int = 0):
    """A NumbaRoutedExperts over one MoE layer (layer id 1) of ``n`` synthetic FP8 experts."""
    from kimi_local.offload.host_experts import NumbaRoutedExperts

    args = k2_args(hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=n, num_hidden_layers=2,
                   first_k_dense_replace=1, intermediate_size=inter, vocab_size=1024)
    ne = NumbaRoutedExperts(args)
    p = ne.layers[1]
    rng = np.random.default_rng(seed)
    # One random source per projection, rotated per expert: distinct bytes in every slot, no NaN codes
    # (0x7F/0xFF); repacking layout is irrelevant for random bytes, so they go straight into the packed arrays.
    for a in (p.w1, p.w3, p.w2):
        src = rng.integers(0, 256, a.shape[1], dtype=np.uint8)
        src[(src & 0x7F) == 0x7F] = 0
        size = src.size
        for s in range(n):
            k = (s * 4099) % size
            a[s, : size - k] = src[k:]
            a[s, size - k:] = src[:k]
    for a in (p.s1, p.s3, p.s2):
        a[...] = rng.uniform(0.5, 1.0, a.shape).astype(np.float32) * np.float32(2.0 ** -8)
    p.filled[:] = True
    ne.finalize()   # compile / load the kernels now (reported), never inside a timed call
    return ne, p


def decode_schedule(n: int, calls: int, rng) -> list[np.ndarray]:
    """``calls`` sets of 8 distinct experts, walking through random permutations of all n (all used)."""
    out, buf = [], []
    while len(out) < calls:
        buf.extend(rng.permutation(n).tolist())
        while len(buf) >= TOPK and len(out) < calls:
            pick, rest = [], []
            for e in buf:
                if len(pick) < TOPK and e not in pick:
                    pick.append(e)
                else:
                    rest.append(e)
            if len(pick) < TOPK:
                break
            out.append(np.array(pick, np.int64))
            buf = rest
    return out


def prefill_routing(n: int, n_tok: int, rng) -> np.ndarray:
    """[n_tok, 8] distinct experts per token, every expert receiving n_tok*8/n tokens (+-1)."""
    calls = decode_schedule(n, n_tok, rng)
    return np.stack(calls)


# ============================================================================================ non-routed layer
class _NonRouted(torch.nn.Module):
    """One K2 layer without its routed experts: norms, MLA, router, shared expert."""

    def __init__(self, args):
        super().__init__()
        from kimi_local.model import MLA, MLP, Gate, RMSNorm
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = MLA(args, 0)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.gate = Gate(args)
        self.shared_experts = MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts)


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure_nonrouted(device: str, *, ctx: int, prefill_tokens: int, quick: bool, log) -> dict:
    """Seconds per layer for decode (1 token at ``ctx``) and prefill (``prefill_tokens`` from position 0):
    attention (norm + MLA) and router + shared expert (norm + gate + MLP), bf16, full K2 shapes."""
    from kimi_local.model import KVCache, attention_dtype, matmul_backend_for, rope_inv_freq, rope_rotation

    dev = torch.device(device)
    args = k2_args()
    a1 = dataclasses.replace(args, num_hidden_layers=1)
    with torch.device("meta"):
        layer = _NonRouted(a1)
    layer = layer.to_empty(device=dev).to(torch.bfloat16)
    g = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, prm in layer.named_parameters():
            if prm.dim() == 1:
                prm.fill_(1.0) if "norm" in name else prm.zero_()
            else:
                prm.copy_((torch.randn(prm.shape, generator=g) * prm.shape[-1] ** -0.5).to(prm.dtype))
        layer.gate.weight.data = layer.gate.weight.data.float()
        if layer.gate.e_score_correction_bias is not None:
            layer.gate.e_score_correction_bias.data = layer.gate.e_score_correction_bias.data.float()
    n_params = sum(p.numel() for p in layer.parameters())
    max_len = max(ctx + 1, prefill_tokens)
    cache = KVCache(a1, max_len, 1, device=dev, dtype=attention_dtype(torch.empty(0, device=dev)))
    cache.kv.normal_()
    cache.pe.normal_()
    inv, amp = rope_inv_freq(args, dev)

    def step(x, start):
        rot = rope_rotation(inv, amp, start, x.shape[1])
        _sync(dev)
        with matmul_backend_for(dev, x.shape[1]):   # the same matmul choice as the model's forward
            t0 = time.perf_counter()
            h = x + layer.self_attn(layer.input_layernorm(x), start, rot, cache, "auto")
            _sync(dev)
            t1 = time.perf_counter()
            hn = layer.post_attention_layernorm(h).reshape(-1, x.shape[-1])
            layer.gate(hn)
            layer.shared_experts(hn)
            _sync(dev)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    xs = torch.randn(1, 1, K2_HIDDEN, generator=g).to(dev, torch.bfloat16)
    xp = torch.randn(1, prefill_tokens, K2_HIDDEN, generator=g).to(dev, torch.bfloat16)
    with torch.inference_mode():
        for _ in range(2):
            step(xs, ctx)
        n_dec = 5 if quick else 20
        dec = [step(xs, ctx) for _ in range(n_dec)]
        step(xp, 0)
        pre = [step(xp, 0) for _ in range(1 if quick else 3)]
    att_d = statistics.median(d[0] for d in dec)
    moe_d = statistics.median(d[1] for d in dec)
    att_p = min(p[0] for p in pre)
    moe_p = min(p[1] for p in pre)
    p = k2_nonrouted_params(args)
    shared_flops = 2 * prefill_tokens * p["shared_expert_per_moe_layer"]
    res = {
        "device": str(dev),
        "dtype": "bfloat16",
        "params_per_layer": n_params,
        "decode_context": ctx,
        "decode_attention_seconds": att_d,
        "decode_router_shared_seconds": moe_d,
        "decode_weight_gbps": (2 * n_params / (att_d + moe_d)) / 1e9,
        "prefill_tokens": prefill_tokens,
        "prefill_attention_seconds": att_p,
        "prefill_router_shared_seconds": moe_p,
        "prefill_shared_expert_tflops": shared_flops / moe_p / 1e12,
    }
    log(f"k2-layer: non-routed on {dev}: decode attention {att_d * 1e3:.2f} ms + router/shared {moe_d * 1e3:.2f} ms; "
        f"prefill({prefill_tokens}) {att_p:.3f} s + {moe_p:.3f} s")
    del layer, cache
    return res


# ============================================================================================ projection
def _proj_decode(t_attn: float, t_rs: float, t_routed: float, t_tail: float, extra: float = 0.0) -> float:
    return K2_LAYERS * t_attn + K2_MOE_LAYERS * (t_rs + t_routed) + t_tail + extra


def project(meas: dict, nr_cpu: dict, nr_gpu: Optional[dict], mem_gbps: float, dram_list: list[float],
            gpu_list: list[str]) -> dict:
    bpe = meas["bytes_per_expert"]
    nrb = k2_nonrouted_bytes_per_token(2)
    p = k2_nonrouted_params()
    frac_dec = meas["decode_bw_fraction"]
    t_routed_dec = meas["decode_seconds_per_layer"]
    t_routed_pre = meas["prefill_seconds_per_full_layer"]      # 512 tokens, 384 experts
    dense_flops = 2 * PROMPT * p["dense_mlp_per_dense_layer"]

    def cpu_side(nr: dict, scale_bw: float = 1.0) -> dict:
        """Non-routed work on the CPU: measured per layer; dense MLP and lm_head from the measured rates."""
        r_nr = nr["decode_weight_gbps"] * 1e9 * scale_bw
        tail_dec = (nrb["dense_mlp"] + nrb["lm_head"] + nrb["embedding_row"]) / r_nr
        t_attn, t_rs = nr["decode_attention_seconds"] / scale_bw, nr["decode_router_shared_seconds"] / scale_bw
        tail_pre = dense_flops / (nr["prefill_shared_expert_tflops"] * 1e12) + 2 * p["lm_head"] / r_nr
        return {"t_attn": t_attn, "t_router_shared": t_rs, "t_tail": tail_dec,
                "t_attn_prefill": nr["prefill_attention_seconds"], "t_rs_prefill": nr["prefill_router_shared_seconds"],
                "t_tail_prefill": tail_pre, "nonrouted_gbps": r_nr / 1e9}

    def gpu_side_est(spec: dict) -> dict:
        a = GPU_ASSUMPTIONS
        bw = spec["hbm_gbps"] * 1e9 * a["hbm_efficiency"]
        fl = spec["bf16_tflops"] * 1e12 * a["flops_efficiency"]
        t_attn = nrb["attention"] / K2_LAYERS / bw + a["per_layer_overhead_s"]
        t_rs = (nrb["router"] + nrb["shared_experts"]) / K2_MOE_LAYERS / bw + a["per_moe_layer_roundtrip_s"]
        tail = (nrb["dense_mlp"] + nrb["lm_head"]) / bw
        H = 64
        attn_flops = 2 * PROMPT * p["attention_per_layer"] + 2 * H * PROMPT * PROMPT * (192 + 128)  # + QK^T, PV
        rs_flops = 2 * PROMPT * (p["shared_expert_per_moe_layer"] + p["router_per_moe_layer"])
        pcie = 2 * PROMPT * K2_HIDDEN * 4 / (spec["pcie_gbps"] * 1e9)   # activations out and back, fp32
        return {"t_attn": t_attn, "t_router_shared": t_rs, "t_tail": tail,
                "t_attn_prefill": attn_flops / fl, "t_rs_prefill": rs_flops / fl + pcie,
                "t_tail_prefill": dense_flops / fl + 2 * p["lm_head"] / fl,
                "hbm_gbps_effective": bw / 1e9, "tflops_effective": fl / 1e12, "pcie_seconds_per_moe_layer": pcie}

    def gpu_side_meas(nr: dict) -> dict:
        d = cpu_side(nr)
        d["t_router_shared"] += GPU_ASSUMPTIONS["per_moe_layer_roundtrip_s"]
        return d

    def row(gbps: float, side: dict, where: str, measured_bw: bool) -> dict:
        # routed decode: bandwidth-bound at this machine's measured kernel efficiency
        t_rd = t_routed_dec if measured_bw else TOPK * bpe / (gbps * 1e9 * frac_dec)
        # routed prefill: this CPU's measured time; a slower memory bounds it by the weight stream
        t_rp = t_routed_pre if measured_bw else max(t_routed_pre, K2_EXPERTS * bpe / (gbps * 1e9))
        t_tok = _proj_decode(side["t_attn"], side["t_router_shared"], t_rd, side["t_tail"])
        t_prompt = (K2_LAYERS * side["t_attn_prefill"] + K2_MOE_LAYERS * (side["t_rs_prefill"] + t_rp)
                    + side["t_tail_prefill"])
        return {
            "dram_gbps": gbps, "nonrouted_on": where,
            "decode_tok_s": 1.0 / t_tok, "prefill_tok_s": PROMPT / t_prompt,
            "decode": {"seconds_per_token": t_tok,
                       "formula": "61*t_attn + 60*(t_router_shared + t_routed) + t_tail",
                       "inputs": {"t_attn": side["t_attn"], "t_router_shared": side["t_router_shared"],
                                  "t_routed": t_rd, "t_tail": side["t_tail"]},
                       "routed_share": K2_MOE_LAYERS * t_rd / t_tok},
            "prefill": {"seconds_per_512_token_prompt": t_prompt,
                        "formula": "512 / (61*t_attn_prefill + 60*(t_rs_prefill + t_routed_prefill) + t_tail_prefill)",
                        "inputs": {"t_attn_prefill": side["t_attn_prefill"], "t_rs_prefill": side["t_rs_prefill"],
                                   "t_routed_prefill": t_rp, "t_tail_prefill": side["t_tail_prefill"]},
                        "routed_share": K2_MOE_LAYERS * t_rp / t_prompt},
        }

    here_gpu = nr_gpu is not None
    here_side = gpu_side_meas(nr_gpu) if here_gpu else cpu_side(nr_cpu)
    here = row(mem_gbps, here_side, "gpu (measured)" if here_gpu else "cpu (measured)", True)
    table = []
    for gbps in [mem_gbps] + [g for g in dram_list if g != mem_gbps]:
        measured = gbps == mem_gbps
        for gname in gpu_list:
            if gname == "none":
                side = cpu_side(nr_cpu, 1.0 if measured else gbps / mem_gbps)
                where = "cpu (measured)" if measured else "cpu (measured, scaled to the DRAM bandwidth)"
            else:
                side = gpu_side_est(GPU_SPECS[gname])
                where = f"{gname} (estimated)"
            r = row(gbps, side, where, measured)
            r["gpu"] = gname
            r["machine"] = "this machine" if measured else f"{gbps:g} GB/s DRAM"
            fits = None
            if gname != "none":
                fits = nrb["total"] < GPU_SPECS[gname]["memory_gb"] * 1e9 * 0.9
            r["nonrouted_fit_in_gpu_memory_bf16"] = fits
            table.append(r)
    return {
        "decode_tok_s": here["decode_tok_s"],
        "prefill_tok_s": here["prefill_tok_s"],
        "decode": here["decode"],
        "prefill": here["prefill"],
        "nonrouted_on": here["nonrouted_on"],
        "constants": {"layers": K2_LAYERS, "moe_layers": K2_MOE_LAYERS, "experts_per_token": TOPK,
                      "experts_per_layer": K2_EXPERTS, "bytes_per_expert": bpe, "prompt_tokens": PROMPT,
                      "nonrouted_bytes_bf16": nrb,
                      "routed_bytes_per_token": K2_MOE_LAYERS * TOPK * bpe},
        "terms": {
            "t_attn": "norm + MLA of one layer (61 layers), measured at full size",
            "t_router_shared": "norm + router + shared expert of one MoE layer (60), measured at full size",
            "t_routed": "routed experts of one MoE layer, 1 token x 8 experts, measured (k2_layer.decode)",
            "t_tail": "dense MLP of layer 0 + lm_head + embedding row, bytes / measured non-routed weight GB/s",
            "t_routed_prefill": "routed experts of one layer for 512 tokens over 384 experts: measured time x 384/n",
            "t_tail_prefill": "dense MLP FLOPs / measured shared-expert prefill FLOP/s + lm_head (last token)",
        },
        "gpu_assumptions": {**GPU_ASSUMPTIONS, "specs": GPU_SPECS,
                            "note": "GPU rows are estimates from spec sheets x the efficiencies above; the routed "
                                    "experts stay on this CPU (measured). Non-routed weights counted in bf16, as the "
                                    "loader keeps them."},
        "dram_assumptions": "routed decode time = 8 x bytes_per_expert / (DRAM GB/s x measured decode_bw_fraction); "
                            "routed prefill = max(measured compute time, 384 x bytes_per_expert / DRAM GB/s); CPU "
                            "non-routed decode scales with DRAM GB/s, its prefill does not",
        "what_if": table,
    }


# ============================================================================================ entry point
def run_k2_layer(args, *, threads: int, quick: bool, log: Callable[[str], None],
                 mem_read_gbps: Callable[[int], float]) -> dict:
    import psutil

    from kimi_local.cpu_kernels import fp8_moe

    fp8_moe.set_num_threads(threads)
    bpe = k2_expert_nbytes()
    avail = psutil.virtual_memory().available
    reserve = (64 << 20) if quick else (2 << 30) + (1 << 30)   # membw buffer + non-routed layer + slack
    if args.k2_experts:
        n = args.k2_experts
    elif quick:
        n = TOPK
    else:
        n = default_expert_count(avail, bpe, reserve)
    if n < TOPK or n > K2_EXPERTS:
        from kimi_local.errors import UserError
        raise UserError(f"--k2-experts must be in [{TOPK}, {K2_EXPERTS}], got {n}")
    if n * bpe + reserve > avail:
        from kimi_local.errors import UserError
        raise UserError(f"{n} full-size experts need {n * bpe / 1e9:.1f} GB + {reserve / 1e9:.1f} GB; only "
                        f"{avail / 1e9:.1f} GB available (lower --k2-experts)")
    log(f"k2-layer: building {n} synthetic full-size experts ({n * bpe / 1e9:.2f} GB) ...")
    t0 = time.perf_counter()
    ne, packed = build_experts(n)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)

    # ------------------------------------------------------------------ decode
    x1 = torch.randn(1, K2_HIDDEN, dtype=torch.float32).to(torch.bfloat16)
    w1 = torch.full((1, TOPK), 1.0 / TOPK, dtype=torch.float32)
    passes = 1 if quick else 3
    sched = decode_schedule(n, max(1, -(-n // TOPK)) * (passes + 1), rng)
    idxs = [torch.from_numpy(s).view(1, TOPK) for s in sched]
    warm = max(1, -(-n // TOPK))
    mem_before = mem_read_gbps(threads, fresh=True)
    for i in range(warm):                         # one pass over all experts: page-in, steady state
        ne(1, x1, idxs[i], w1)
    # Decode runs in bursts, each between two readings of the ceiling over the experts' own memory (the very pages
    # decode streams): on a shared machine the achievable DRAM rate drifts within seconds, so every burst is
    # divided by the higher of the two readings taken around it, and the median burst is the figure.
    from kimi_local.cpu_kernels import membw
    wflat = packed.w1.reshape(-1)
    wflat = wflat[: wflat.size // 8 * 8].view(np.uint64)
    ceil_passes = 1 if quick else 2
    bursts = 1 if quick else 5
    t_burst = 0.3 if quick else 0.5
    times, burst_fracs, ceilings = [], [], [membw.mem_read_gbps(threads, passes=ceil_passes, buf=wflat)]
    dec_bytes = TOPK * bpe
    i = warm
    for b in range(bursts):
        bt = []
        t_end = time.perf_counter() + t_burst
        while time.perf_counter() < t_end or len(bt) < 3:
            t0 = time.perf_counter()
            ne(1, x1, idxs[i % len(idxs)], w1)
            bt.append(time.perf_counter() - t0)
            i += 1
        ceilings.append(membw.mem_read_gbps(threads, passes=ceil_passes, buf=wflat))
        burst_fracs.append(dec_bytes / float(np.median(bt)) / 1e9 / max(ceilings[-2], ceilings[-1]))
        times += bt
    del wflat
    t_dec = float(np.median(times))
    frac = float(np.median(burst_fracs))
    # For the record, the whole run against the highest ceiling seen anywhere in it (fresh 2 GiB buffers before
    # and after, the expert memory between the bursts): the most conservative pairing, which mixes moments.
    mem_after = mem_read_gbps(threads, fresh=True)
    mem_experts = max(ceilings)
    mem = max(mem_before, mem_after, mem_experts)
    frac_global = dec_bytes / t_dec / 1e9 / mem
    log(f"k2-layer: decode {t_dec * 1e3:.2f} ms per MoE layer = {dec_bytes / t_dec / 1e9:.1f} GB/s; "
        f"{frac:.2f} of the read ceiling measured around each burst (median of {bursts}: "
        f"{' '.join(f'{f:.2f}' for f in burst_fracs)}); {frac_global:.2f} of the run's highest ceiling {mem:.1f} GB/s")

    # ------------------------------------------------------------------ prefill
    n_tok = max(TOPK, int(round(PROMPT * n / K2_EXPERTS)))
    slots = torch.from_numpy(prefill_routing(n, n_tok, rng))
    xp = torch.randn(n_tok, K2_HIDDEN).to(torch.bfloat16)
    wp = torch.rand(n_tok, TOPK, dtype=torch.float32)
    ne(1, xp, slots, wp)
    pt = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        ne(1, xp, slots, wp)
        pt.append(time.perf_counter() - t0)
    t_pre = min(pt)
    t_pre_full = t_pre * K2_EXPERTS / n
    eff = n_tok * TOPK * bpe / t_pre
    log(f"k2-layer: prefill {n_tok} tokens over {n} experts: {t_pre:.3f} s ({n_tok / t_pre:.0f} tok/s, "
        f"effective {eff / 1e9:.1f} GB/s of weights) -> {t_pre_full:.2f} s per 384-expert layer for 512 tokens")
    compile_s = ne.compile_seconds
    del ne, packed, idxs, xp, slots

    # ------------------------------------------------------------------ non-routed layer(s)
    ctx = 64 if quick else 512
    ptoks = 32 if quick else PROMPT
    nr_cpu = measure_nonrouted("cpu", ctx=ctx, prefill_tokens=ptoks, quick=quick, log=log)
    if ptoks != PROMPT:  # quick: scale the small prefill to 512 tokens linearly (stated)
        for k in ("prefill_attention_seconds", "prefill_router_shared_seconds"):
            nr_cpu[k] *= PROMPT / ptoks
        nr_cpu["prefill_scaled_from_tokens"] = ptoks
    nr_gpu = None
    if torch.cuda.is_available():
        nr_gpu = measure_nonrouted("cuda", ctx=ctx, prefill_tokens=PROMPT, quick=quick, log=log)

    layer = {
        "experts": n,
        "experts_full_layer": K2_EXPERTS,
        "hidden": K2_HIDDEN, "inter": K2_INTER, "topk": TOPK,
        "bytes_per_expert": bpe,
        "experts_bytes": n * bpe,
        "ram_available_bytes": int(avail),
        "build_seconds": build_s,
        "compile_seconds": compile_s,
        "threads": threads,
        "backend": "numba-avx512bf16" if fp8_moe.fast_path_available() else "numba-portable",
        "precision": fp8_moe.get_precision(fp8_moe.precision_for(torch.bfloat16)),   # what the bf16 calls ran
        "mem_read_gbps": mem,
        "mem_read_gbps_before_after": [mem_before, mem_after],
        "mem_read_gbps_on_expert_memory": mem_experts,
        "mem_read_gbps_around_bursts": ceilings,
        "mem_read_note": "decode_bw_fraction = the median over decode bursts of each burst's rate divided by the "
                         "higher of the two read ceilings measured over the experts' own memory right before and "
                         "right after it; decode_bw_fraction_vs_run_max divides the whole run's median by "
                         "mem_read_gbps, the highest ceiling seen anywhere in the run (fresh 2 GiB buffers before "
                         "and after, the expert memory between bursts)",
        "decode": {"seconds_per_layer": t_dec, "seconds_per_layer_best": float(np.min(times)),
                   "calls": len(times), "weight_bytes_per_layer": dec_bytes, "gbps": dec_bytes / t_dec / 1e9},
        "decode_bw_fraction": frac,
        "decode_bw_fraction_bursts": burst_fracs,
        "decode_bw_fraction_vs_run_max": frac_global,
        "prefill": {"tokens": n_tok, "tokens_per_expert": n_tok * TOPK / n, "seconds": t_pre,
                    "tokens_per_s": n_tok / t_pre, "effective_gbps": eff / 1e9,
                    "seconds_per_full_layer_512_tokens": t_pre_full},
        "nonrouted_cpu": nr_cpu,
        "nonrouted_gpu": nr_gpu,
        "quick": quick,
    }
    meas = {"bytes_per_expert": bpe, "decode_bw_fraction": frac, "decode_seconds_per_layer": t_dec,
            "prefill_seconds_per_full_layer": t_pre_full}
    gpus = args.gpu or list(("none", "4090", "h100"))
    proj = project(meas, nr_cpu, nr_gpu, mem, list(args.dram_gbps or []), gpus)
    log(f"k2-layer: projected Kimi-K2 on this machine: decode {proj['decode_tok_s']:.2f} tok/s, "
        f"prefill {proj['prefill_tok_s']:.1f} tok/s (non-routed on {proj['nonrouted_on']})")
    return {"k2_layer": layer, "k2_projection": proj}
