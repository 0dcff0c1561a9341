"""make-tiny, generate and perplexity through the real command line."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from kimi_local.checkpoint import load_model
from kimi_local.commands import score_tokens, window_plan
from kimi_local.tokenizer import KimiTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, check=True):
    r = subprocess.run([sys.executable, os.path.join(REPO, "cli.py"), *args], capture_output=True, text=True,
                       timeout=300, cwd=REPO)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {r.stderr}")
    return r


@pytest.mark.parametrize("n,ctx", [(10, 16), (16, 16), (17, 16), (100, 16), (101, 7), (50, 2)])
def test_window_plan_scores_every_token_once(n, ctx):
    scored = []
    for start, end, first in window_plan(n, ctx):
        assert end - start <= ctx and start <= first - 1 < end
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


def test_perplexity_matches_direct_computation(tiny_dir, tmp_path):
    text = "The engineer walked to her workshop and opened the windows to listen to the birds. " * 3
    tok = KimiTokenizer.from_model_dir(tiny_dir)
    ids = tok.encode(text)
    m = load_model(tiny_dir, dtype=torch.float32, expert_backend="torch")
    logp = torch.log_softmax(m(torch.tensor([ids]))[0], -1)
    direct = -logp[:-1].gather(1, torch.tensor(ids[1:])[:, None]).mean().item()
    total, n = score_tokens(m, ids, ctx=4096, chunk=7)    # chunked prefill inside one window
    assert n == len(ids) - 1 and abs(total / n - direct) < 1e-4
    f = tmp_path / "t.txt"
    f.write_text(text)
    out = json.loads(cli("perplexity", "--model", tiny_dir, "--file", str(f), "--dtype", "float32", "--json").stdout)
    assert out["tokens"] == len(ids)
    assert abs(out["nll"] - direct) < 1e-3 and abs(out["perplexity"] - math.exp(out["nll"])) < 1e-6
    # Windowed scoring of a text longer than --ctx still scores every token once.
    out2 = json.loads(cli("perplexity", "--model", tiny_dir, "--file", str(f), "--dtype", "float32", "--ctx", "16", "--json").stdout)
    assert out2["tokens"] == len(ids) and math.isfinite(out2["nll"])


def test_generate_json_greedy_is_deterministic(tiny_dir):
    args = ("generate", "--model", tiny_dir, "--prompt", "Once upon a time", "--max-tokens", "8", "--json")
    a = json.loads(cli(*args).stdout)
    b = json.loads(cli(*args, "--expert-backend", "torch").stdout)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 8
    assert set(a["timings"]) >= {"prompt_tokens", "prefill_tok_s", "decode_tok_s"}
    tok = KimiTokenizer.from_model_dir(tiny_dir)
    assert a["text"] == tok.decode(a["token_ids"])


def test_make_tiny_cli_and_errors(tmp_path):
    d = tmp_path / "m"
    r = cli("make-tiny", str(d), "--seed", "3")
    assert "wrote tiny" in r.stdout and (d / "config.json").exists()
    r = cli("make-tiny", str(d), check=False)
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
    r = cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x", check=False)
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr
