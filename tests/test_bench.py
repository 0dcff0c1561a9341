"""`kimi-local bench`: every mode runs in quick mode and writes JSON matching the schema.

Speeds are never asserted (they depend on the machine and its neighbours); only structure, keys, and
internal consistency (ratios are what their parts say they are) are checked.
"""

import json
import math
import os
import statistics
import subprocess
import sys

import pytest

from kimi_local.bench.schema import MODE_SECTIONS, SCHEMA, get, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(tmp_path, *args, timeout=180):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(REPO, "cli.py"), "bench", *args, "--quick", "--threads", "1",
           "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert validate(doc) == [], validate(doc)
    return doc, r.stdout


def test_e2e_quick(tmp_path):
    doc, stdout = run_bench(tmp_path, "--plot", str(tmp_path / "fig.png"))
    assert doc["mode"] == "e2e" and doc["quick"] is True
    e = doc["e2e"]
    assert [p["prompt_tokens"] for p in e["prefill"]] == [16, 64]
    assert e["decode"][0]["prompt_tokens"] == 1            # "context 0" = a one-token prompt
    for d in e["decode"]:
        sp = d["split"]["per_token_seconds"]
        assert sp["routed_gpu"] == 0.0                        # no GPU tier in this run
        assert sp["routed_cpu"] > 0
        # the categories add up to the measured time per token (other is the remainder)
        assert math.isclose(sum(sp.values()), d["split"]["seconds_per_token"], rel_tol=1e-6)
        tr = d["expert_traffic"]
        # tiny model, all experts in RAM: 8 experts x 2 MoE layers per decoded token
        assert tr["ram_bytes_per_token"] == 16 * tr["bytes_per_expert"]
        assert tr["gpu_bytes_per_token"] == 0 and tr["disk_bytes_per_token"] == 0
    c = doc["compare_hf"]
    if c["available"]:
        assert c["threads"] == 1 and c["dtype"] == "bfloat16"
        assert math.isclose(c["prefill_ratio"], c["ours_prefill_tok_s"] / c["hf_prefill_tok_s"], rel_tol=1e-9)
        assert math.isclose(c["decode_ratio"], c["ours_decode_tok_s"] / c["hf_decode_tok_s"], rel_tol=1e-9)
    assert "vs HF transformers" in stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (tmp_path / "fig.png").stat().st_size > 1000


def test_kernels_quick(tmp_path):
    doc, _ = run_bench(tmp_path, "kernels")
    k = doc["kernels"]
    assert math.isclose(k["decode_bw_fraction"], k["decode"]["gbps"] / k["mem_read_gbps"], rel_tol=1e-9)
    for key in ("decode", "mem_read_gbps", "decode_bw_fraction", "prefill", "torch_reference", "compile_seconds"):
        assert key in k
    # default: the bf16 model's precision, the prefill also timed in the other one
    if k["backend"] == "numba-avx512bf16":
        assert (k["decode"]["precision"], k["prefill_other_precision"]["precision"]) == ("bf16", "bf16x2")
        forced, out = run_bench(tmp_path, "kernels", "--expert-precision", "bf16x2")
        f = forced["kernels"]
        assert f["decode"]["precision"] == f["prefill"]["precision"] == "bf16x2"
        assert "float32 models" not in out        # no second, identical prefill line


def test_k2_layer_quick_with_what_if(tmp_path):
    doc, stdout = run_bench(tmp_path, "k2-layer", "--dram-gbps", "100", "--gpu", "none", "--gpu", "h100")
    kl, kp = doc["k2_layer"], doc["k2_projection"]
    assert kl["hidden"] == 7168 and kl["inter"] == 2048 and kl["bytes_per_expert"] == 44_050_944
    if kl["backend"] == "numba-avx512bf16":   # the layer's bf16 activations run the kernels in bf16
        assert kl["precision"] == "bf16"
    # the headline fraction is the median burst, each against the ceilings read around it; the whole run
    # against its highest ceiling is kept beside it
    assert math.isclose(kl["decode_bw_fraction"], statistics.median(kl["decode_bw_fraction_bursts"]), rel_tol=1e-9)
    assert len(kl["mem_read_gbps_around_bursts"]) == len(kl["decode_bw_fraction_bursts"]) + 1
    assert math.isclose(kl["decode_bw_fraction_vs_run_max"], kl["decode"]["gbps"] / kl["mem_read_gbps"],
                        rel_tol=1e-9)
    assert kl["mem_read_gbps"] >= max(kl["mem_read_gbps_around_bursts"])
    # every projected figure is its formula applied to its inputs
    i = kp["decode"]["inputs"]
    t = 61 * i["t_attn"] + 60 * (i["t_router_shared"] + i["t_routed"]) + i["t_tail"]
    assert math.isclose(kp["decode_tok_s"], 1 / t, rel_tol=1e-9)
    p = kp["prefill"]["inputs"]
    t = 61 * p["t_attn_prefill"] + 60 * (p["t_rs_prefill"] + p["t_routed_prefill"]) + p["t_tail_prefill"]
    assert math.isclose(kp["prefill_tok_s"], 512 / t, rel_tol=1e-9)
    rows = {(r["machine"], r["gpu"]) for r in kp["what_if"]}
    assert rows == {("this machine", "none"), ("this machine", "h100"), ("100 GB/s DRAM", "none"),
                    ("100 GB/s DRAM", "h100")}
    here = next(r for r in kp["what_if"] if r["machine"] == "this machine" and r["gpu"] == "none")
    assert math.isclose(here["decode_tok_s"], kp["decode_tok_s"], rel_tol=1e-9)   # no GPU on the test machine
    assert "what-if" in stdout


def test_load_quick(tmp_path):
    doc, _ = run_bench(tmp_path, "load")
    ld = doc["load"]
    assert ld["load_bytes"] <= ld["checkpoint_bytes"]
    assert math.isclose(ld["ratio_vs_plain_read"], ld["load_bytes_per_s"] / ld["plain_read_bytes_per_s"], rel_tol=1e-9)
    assert ld["resident_bytes"] > 0 and ld["peak_rss_bytes"] >= ld["baseline_rss_bytes"]


def test_offload_quick(tmp_path):
    doc, out = run_bench(tmp_path, "offload", "--plot", str(tmp_path / "p.png"))
    off = doc["offload"]
    budgets = [(r["expert_ram"], r["prefetch"]) for r in off["disk_tier"]]
    assert budgets == [("100%", True), ("50%", True), ("50%", False), ("25%", True), ("25%", False)]
    full = off["disk_tier"][0]
    assert full["ram_hit_rate"] == 1.0 and full["disk_bytes_per_token"] == 0
    assert all(r["disk_bytes_per_token"] > 0 for r in off["disk_tier"][1:])
    assert 0 <= off["predictor"]["precision"] <= 1 and 0 <= off["predictor"]["recall"] <= 1
    assert {r["policy"] for r in off["cachesim"]} == {"lru", "lfu", "predictive"}
    assert (tmp_path / "p.png").stat().st_size > 0
    # the readable summary carries the table, one row per budget
    assert "offload (" in out and "cachesim" in out
    rows = [ln for ln in out.splitlines() if ln.strip().startswith(("100%", "50%", "25%"))]
    assert len(rows) == 5 and f"{full['decode_tok_s']:.1f}" in rows[0]


# ------------------------------------------------------------------------------------------ schema unit tests

def _minimal(mode="kernels"):
    return {"schema_version": 1, "kimi_local_version": "0", "mode": mode, "quick": True,
            "machine": {"cpu_model": "x", "isa_flags": [], "physical_cores": 2, "threads": 2, "ram_total_bytes": 1},
            "seconds": {"total": 1.0}}


def test_schema_catches_missing_sections_and_bad_types():
    doc = _minimal("k2-layer")
    errs = validate(doc)
    assert "$.k2_layer: missing (mode k2-layer)" in errs and "$.k2_projection: missing (mode k2-layer)" in errs
    doc = _minimal("kernels")
    doc["kernels"] = {"decode_bw_fraction": "fast"}
    errs = validate(doc)
    assert any(e.startswith("$.kernels.decode_bw_fraction: expected number") for e in errs)
    assert any(e == "$.kernels.mem_read_gbps: missing" for e in errs)
    doc["kernels"]["decode_bw_fraction"] = float("nan")
    assert any("not a finite number" in e for e in validate(doc))


def test_schema_names_the_tracked_keys():
    props = SCHEMA["properties"]
    for dotted in ("compare_hf.prefill_ratio", "compare_hf.decode_ratio", "k2_projection.decode_tok_s",
                   "k2_projection.prefill_tok_s", "k2_layer.decode_bw_fraction", "kernels.decode",
                   "kernels.mem_read_gbps", "kernels.decode_bw_fraction", "kernels.prefill",
                   "kernels.torch_reference", "kernels.compile_seconds"):
        sec, key = dotted.split(".")
        assert key in props[sec]["required"], dotted
    assert set(MODE_SECTIONS["all"]) == {"e2e", "compare_hf", "kernels", "k2_layer", "k2_projection", "load", "offload"}
    assert get({"a": {"b": 3}}, "a.b") == 3


def test_schema_is_valid_json_schema_where_jsonschema_exists():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
