"""The readable stdout summary of a bench JSON document."""

from __future__ import annotations

from kimi_local.bench.common import fmt_bytes


def _f(v, spec: str = ".2f", none: str = "-") -> str:
    return none if v is None else format(v, spec)


def summary(doc: dict) -> str:
    m = doc.get("machine", {})
    lines = [f"kimi-local bench {doc.get('mode')}{' (quick)' if doc.get('quick') else ''} — "
             f"{m.get('cpu_model')} [{' '.join(m.get('isa_flags', []))}], {m.get('threads')} threads, "
             f"{fmt_bytes(m.get('ram_total_bytes'))} RAM, GPU: {(m.get('gpu') or {}).get('name', 'none')}"]
    e = doc.get("e2e")
    if e:
        mo = e["model"]
        ld = e["load"]
        lines.append(f"\nend-to-end: {mo['dir']} ({mo['layers']} layers, {mo['n_routed_experts']} experts, "
                     f"{mo['dtype']}, experts: {mo['expert_backend']})")
        lines.append(f"  load          {fmt_bytes(ld['bytes'])} in {_f(ld['load_seconds'])} s = "
                     f"{fmt_bytes(ld['bytes_per_s'])}/s; ready after {ld['seconds_to_ready']:.2f} s "
                     f"(kernel compile {_f(ld['compile_seconds'])} s)")
        lines.append("  prefill       " + ",  ".join(f"{p['prompt_tokens']} tok: {p['tok_s']:.1f} tok/s"
                                                  for p in e["prefill"]))
        lines.append("  decode        " + ",  ".join(f"ctx {d['prompt_tokens']}: {d['tok_s']:.2f} tok/s"
                                                  for d in e["decode"]))
        d0 = e["decode"][0]
        sp = d0["split"]["per_token_seconds"]
        lines.append(f"  split (ctx {d0['prompt_tokens']}, ms/token, instrumented run): " + ", ".join(
            f"{k} {v * 1e3:.2f}" for k, v in sp.items()))
        tr = e["expert_traffic"]
        lines.append(f"  experts/token RAM {fmt_bytes(tr['ram_bytes_per_token'])}, GPU {fmt_bytes(tr['gpu_bytes_per_token'])},"
                     f" disk {fmt_bytes(tr['disk_bytes_per_token'])}; routed phase {_f(tr['routed_cpu_gbps'])} GB/s = "
                     f"{_f(tr['dram_bw_fraction'])} of the {e['mem_read_gbps']:.1f} GB/s read ceiling")
    c = doc.get("compare_hf")
    if c:
        if c.get("available"):
            lines.append(f"  vs HF transformers {c['transformers_version']} ({c['hf_attn_implementation']} attention, "
                         f"{c['hf_experts_implementation']} experts, {c['dtype']}, {c['threads']} threads): "
                         f"prefill {c['prefill_tokens']} tok x{c['prefill_ratio']:.2f} "
                         f"({c['ours_prefill_tok_s']:.1f} vs {c['hf_prefill_tok_s']:.1f} tok/s), decode x{c['decode_ratio']:.2f} "
                         f"({c['ours_decode_tok_s']:.2f} vs {c['hf_decode_tok_s']:.2f} tok/s)  [goals: x3, x5]")
        else:
            lines.append(f"  vs HF transformers: skipped ({c.get('reason')})")
    k = doc.get("kernels")
    if k:
        lines.append(f"\nkernels ({k['shapes']['hidden']}x{k['shapes']['inter']}, {k['shapes']['n_experts']} experts, "
                     f"{k.get('backend')}, {k['threads']} threads):")
        lines.append(f"  decode        {k['decode']['seconds_per_moe_layer'] * 1e3:.2f} ms/MoE layer = "
                     f"{k['decode']['gbps']:.1f} GB/s = {k['decode_bw_fraction']:.2f} of {k['mem_read_gbps']:.1f} GB/s"
                     f"  [goal 0.65]")
        lines.append(f"  prefill       {k['prefill']['tokens']} tok: {k['prefill']['tokens_per_s']:.0f} tok/s, "
                     f"effective {k['prefill']['effective_gbps']:.1f} GB/s ({_f(k.get('prefill_over_decode'))}x decode)"
                     f"  [goal 3x; {k['decode'].get('precision', '?')} activations]")
        po = k.get("prefill_other_precision")
        if po and po.get("precision") != k["prefill"].get("precision"):   # the same when a precision is forced
            lines.append(f"  prefill       in {po['precision']} activations (float32 models): effective "
                         f"{po['effective_gbps']:.1f} GB/s ({_f(po.get('over_decode'))}x decode)")
        lines.append(f"  torch ref     x{k['torch_reference']['speedup_numba_over_torch']:.1f} slower; compile "
                     f"{k['compile_seconds']:.2f} s")
    kl = doc.get("k2_layer")
    if kl:
        lines.append(f"\nk2-layer ({kl['experts']} of 384 full-size experts, {fmt_bytes(kl['experts_bytes'])}, "
                     f"{kl['threads']} threads):")
        bursts = kl.get("decode_bw_fraction_bursts") or []
        lines.append(f"  decode        {kl['decode']['seconds_per_layer'] * 1e3:.2f} ms/layer = {kl['decode']['gbps']:.1f} GB/s"
                     f" = {kl['decode_bw_fraction']:.2f} of the read ceiling measured around each burst (median of"
                     f" {' '.join(f'{f:.2f}' for f in bursts)})  [goal 0.60]")
        if kl.get("decode_bw_fraction_vs_run_max") is not None:
            lines.append(f"                {kl['decode_bw_fraction_vs_run_max']:.2f} of the run's highest ceiling, "
                         f"{kl['mem_read_gbps']:.1f} GB/s")
        p = kl["prefill"]
        lines.append(f"  prefill       {p['tokens']} tok over {kl['experts']} experts: {p['seconds']:.3f} s, effective "
                     f"{p['effective_gbps']:.1f} GB/s -> {p['seconds_per_full_layer_512_tokens']:.2f} s per 384-expert "
                     f"layer for 512 tokens")
        nr = kl["nonrouted_cpu"]
        lines.append(f"  non-routed    CPU decode: attention {nr['decode_attention_seconds'] * 1e3:.1f} ms + router/shared "
                     f"{nr['decode_router_shared_seconds'] * 1e3:.1f} ms per layer ({nr['decode_weight_gbps']:.1f} GB/s)")
    kp = doc.get("k2_projection")
    if kp:
        d = kp["decode"]["inputs"]
        lines.append(f"  projection    Kimi-K2 here: decode {kp['decode_tok_s']:.2f} tok/s = 1 / ({kp['decode']['formula']}) "
                     f"with t_attn {d['t_attn'] * 1e3:.2f} ms, t_router_shared {d['t_router_shared'] * 1e3:.2f} ms, "
                     f"t_routed {d['t_routed'] * 1e3:.2f} ms, t_tail {d['t_tail'] * 1e3:.1f} ms")
        pi = kp["prefill"]["inputs"]
        lines.append(f"                prefill {kp['prefill_tok_s']:.1f} tok/s = {kp['prefill']['formula']} with "
                     f"t_attn_prefill {pi['t_attn_prefill']:.3f} s, t_rs_prefill {pi['t_rs_prefill']:.3f} s, "
                     f"t_routed_prefill {pi['t_routed_prefill']:.3f} s, t_tail_prefill {pi['t_tail_prefill']:.3f} s")
        lines.append("  what-if       machine               GPU    decode tok/s  prefill tok/s  (routed share of decode)")
        for r in kp["what_if"]:
            lines.append(f"                {r['machine']:<21} {r['gpu']:<6} {r['decode_tok_s']:12.2f}  {r['prefill_tok_s']:13.1f}"
                         f"  ({r['decode']['routed_share']:.0%})")
    ld = doc.get("load")
    if ld:
        lines.append(f"\nload ({fmt_bytes(ld['checkpoint_bytes'])} checkpoint in page cache, {ld['threads']} threads):")
        lines.append(f"  plain read {fmt_bytes(ld['plain_read_bytes_per_s'])}/s; load_model() {ld['load_seconds']:.2f} s = "
                     f"{fmt_bytes(ld['load_bytes_per_s'])}/s "
                     f"= {ld['ratio_vs_plain_read']:.2f} of it ({ld['ratio_vs_plain_read_excluding_compile']:.2f} without "
                     f"the {ld['compile_seconds']:.2f} s kernel compile)  [goal 0.70]")
        if ld.get("loader_timer_seconds"):
            lines.append(f"  (the loader's own timer, which starts after the model skeleton and expert arrays exist: "
                         f"{ld['loader_timer_seconds']:.2f} s = {fmt_bytes(ld['loader_timer_bytes_per_s'])}/s)")
        if ld.get("plain_read_into_new_memory_bytes_per_s"):
            lines.append(f"  plain read into new resident memory {fmt_bytes(ld['plain_read_into_new_memory_bytes_per_s'])}/s "
                         f"(ratio {ld['ratio_vs_plain_read_into_new_memory']:.2f}; fresh memory faults in at "
                         f"{fmt_bytes(ld['first_touch_bytes_per_s'])}/s on this machine)")
        lines.append(f"  peak RSS {fmt_bytes(ld['peak_rss_bytes'])} (baseline {fmt_bytes(ld['baseline_rss_bytes'])}); "
                     f"growth {ld['peak_rss_over_resident']:.2f}x the {fmt_bytes(ld['resident_bytes'])} kept resident "
                     f"(anonymous {ld['peak_anon_over_resident']:.2f}x)  [goal 1.2]")
    off = doc.get("offload")
    if off:
        lines.append("\noffload (decode with a RAM budget for the routed experts, the rest read from the checkpoint):")
        lines.append("  expert RAM  prefetch  decode tok/s  RAM hit rate  disk bytes/token  precision / recall")
        for r in off.get("disk_tier", []):
            pr = (f"{r['prediction_precision']:.2f} / {r['prediction_recall']:.2f}"
                  if r.get("prediction_precision") is not None and r["expert_ram"] != "100%" else "-")
            lines.append(f"  {r['expert_ram']:>10}  {'on' if r['prefetch'] else 'off':>8}  {r['decode_tok_s']:12.1f}  "
                         f"{r['ram_hit_rate']:12.2f}  {fmt_bytes(r['disk_bytes_per_token']):>16}  {pr}")
        sims = off.get("cachesim") or []
        if sims:
            slots = sorted({c["slots"] for c in sims})
            pols = sorted({c["policy"] for c in sims})
            lines.append("  cachesim (synthetic K2-shaped trace), hit rate by slots per layer:")
            lines.append("    slots  " + "  ".join(f"{p:>10}" for p in pols))
            for n in slots:
                row = {c["policy"]: c["hit_rate"] for c in sims if c["slots"] == n}
                lines.append(f"    {n:5d}  " + "  ".join(f"{_f(row.get(p), '.3f'):>10}" for p in pols))
    s = doc.get("seconds", {})
    lines.append(f"\n(bench took {s.get('total', 0):.1f} s)")
    return "\n".join(lines)
