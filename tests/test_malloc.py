"""glibc malloc tuning (kimi_local._malloc): applied by default, the user's own settings win, and forward
passes stop faulting their temporaries in again."""

import json
import os
import platform
import subprocess
import sys

import pytest

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt tuning is glibc-specific")

_FAULTS = r"""
import json, resource, sys, torch
from kimi_local import _malloc
from kimi_local.checkpoint import load_model
torch.set_num_threads(1)
m = load_model(sys.argv[1])
for mod in m.modules():      # the torch attention code: MiBs of scores and probabilities per layer and pass
    if type(mod).__name__ == "MLA":
        mod.fast = None
ids = torch.arange(512).remainder(m.args.vocab_size)[None]
cache = m.new_cache(512)
m(ids, 0, cache, last_only=True)
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    m(ids, 0, cache, last_only=True)
print(json.dumps({"status": _malloc.status,
                  "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 3}))
"""


def _run(code, *args, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "KIMI_LOCAL_MALLOC"}
    e.update(env)
    out = subprocess.run([sys.executable, "-c", code, *args], env=e, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


_STATUS = "import json; from kimi_local import _malloc; print(json.dumps({'status': _malloc.status}))"


@glibc_only
def test_applied_by_default_and_user_settings_win():
    assert _run(_STATUS)["status"] == "applied"
    assert _run(_STATUS, MALLOC_TRIM_THRESHOLD_="1000000")["status"] == "skipped: MALLOC_TRIM_THRESHOLD_ is set"
    assert _run(_STATUS, GLIBC_TUNABLES="glibc.malloc.arena_max=2")["status"] == "skipped: GLIBC_TUNABLES is set"
    assert _run(_STATUS, GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX2")["status"] == "applied"   # not a malloc one
    assert _run(_STATUS, KIMI_LOCAL_MALLOC="default")["status"].startswith("skipped")


@glibc_only
def test_forward_passes_reuse_their_memory(tiny_dir):
    """A 512-token prefill through torch's attention allocates MiBs of temporaries per layer; with the tuning
    the next pass finds them in the heap instead of faulting fresh pages in (thousands of faults per pass with
    glibc's defaults).  (The CPU attention kernels avoid most of these temporaries; a 2040-token prefill with
    them still faulted ~36,000 pages per pass untuned against 10,000-14,000 tuned.)"""
    tuned = _run(_FAULTS, tiny_dir)
    default = _run(_FAULTS, tiny_dir, KIMI_LOCAL_MALLOC="default")
    assert tuned["status"] == "applied" and default["status"].startswith("skipped")
    assert tuned["faults"] < 500 and tuned["faults"] * 5 < default["faults"], (tuned, default)
