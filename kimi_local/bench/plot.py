"""``--plot FILE.png``: the figures easier seen than read (matplotlib, an optional bench dependency).

Panels, as the document has data for them: decode tok/s vs context; the per-token decode time split (one bar
per context); expert-cache hit rate vs cache size (offload runs / cache sweeps); the K2 what-if projection.
"""

from __future__ import annotations

from typing import Optional

from kimi_local.bench.schema import SPLIT_KEYS


def _hit_rate_series(doc: dict) -> Optional[dict]:
    """{policy: [(slots, hit_rate)]} from a cache sweep in the document, if any."""
    sweep = ((doc.get("e2e") or {}).get("cache_sweep") or (doc.get("offload") or {}).get("cachesim")
             or doc.get("cache_sweep"))
    if not sweep:
        return None
    out: dict = {}
    for r in sweep:
        out.setdefault(r["policy"], []).append((r["slots"], r["hit_rate"]))
    return {k: sorted(v) for k, v in out.items()}


def plot(doc: dict, path: str) -> Optional[str]:
    """Write the figure; returns a message when nothing could be drawn (None on success)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "--plot needs matplotlib: pip install 'kimi-local[bench]'"
    panels = []
    e = doc.get("e2e")
    if e:
        panels += ["decode", "split"]
    hits = _hit_rate_series(doc)
    if hits:
        panels.append("hits")
    if doc.get("k2_projection"):
        panels.append("k2")
    if doc.get("kernels") or doc.get("k2_layer"):
        panels.append("bw")
    if not panels:
        return "--plot: nothing to draw for this mode"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    axes = axes[0]
    m = doc.get("machine", {})
    fig.suptitle(f"kimi-local bench — {m.get('cpu_model')}, {m.get('threads')} threads", fontsize=10)
    for ax, kind in zip(axes, panels):
        if kind == "decode":
            ctx = [d["prompt_tokens"] for d in e["decode"]]
            ax.plot(ctx, [d["tok_s"] for d in e["decode"]], "o-", label="kimi-local")
            c = doc.get("compare_hf") or {}
            if c.get("available"):
                ax.plot([c["decode_context"]], [c["hf_decode_tok_s"]], "s", label="HF transformers")
                ax.plot([c["decode_context"]], [c["ours_decode_tok_s"]], "^", label="kimi-local (same run as HF)")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("decode tok/s")
            ax.set_title("decode speed vs context")
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
        elif kind == "split":
            labels = [str(d["prompt_tokens"]) for d in e["decode"]]
            bottom = [0.0] * len(labels)
            keys = list(SPLIT_KEYS[:-1]) + ["dense_mlp", "other"]
            for k in keys:
                vals = [d["split"]["per_token_seconds"].get(k, 0.0) * 1e3 for d in e["decode"]]
                ax.bar(labels, vals, bottom=bottom, label=k)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("ms per token")
            ax.set_title("decode time split per token")
            ax.legend(fontsize=7)
        elif kind == "hits":
            for pol, pts in hits.items():
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=pol)
            ax.set_xlabel("cache slots per layer")
            ax.set_ylabel("hit rate")
            ax.set_ylim(0, 1)
            ax.set_title("expert cache hit rate vs size")
            ax.legend(fontsize=8)
        elif kind == "k2":
            rows = doc["k2_projection"]["what_if"]
            labels = [f"{r['dram_gbps']:.0f} GB/s\n{r['gpu']}" for r in rows]
            ax.bar(labels, [r["decode_tok_s"] for r in rows])
            ax.set_ylabel("projected Kimi-K2 decode tok/s")
            ax.set_title("K2 projection (what-if)")
            ax.tick_params(axis="x", labelsize=7)
        elif kind == "bw":
            names, vals = [], []
            k = doc.get("kernels")
            if k:
                names += ["read ceiling", "kernel decode"]
                vals += [k["mem_read_gbps"], k["decode"]["gbps"]]
            kl = doc.get("k2_layer")
            if kl:
                names += ["ceiling (k2-layer)", "k2-layer decode"]
                vals += [kl["mem_read_gbps"], kl["decode"]["gbps"]]
            ax.bar(names, vals, color=["gray", "C0"] * (len(names) // 2))
            ax.set_ylabel("GB/s")
            ax.set_title("routed-expert decode vs DRAM read ceiling")
            ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
