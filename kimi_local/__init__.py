"""kimi-local: run Kimi-K2-Instruct (DeepSeek-V3 architecture, block-FP8) on one workstation."""

import os as _os

__version__ = "0.1.0"

# torch and the Numba kernels each run a GNU OpenMP thread pool, used alternately many times per token.
# libgomp's default lets idle threads spin for 300,000 iterations, long enough that one pool's spinning
# threads steal the cores the other pool needs: measured on a busy 2-core machine, decode of the tiny
# model fell to ~2 tok/s.  Never sleeping (OMP_WAIT_POLICY=PASSIVE) costs a wake-up per op (~140 tok/s);
# a short spin keeps threads hot between back-to-back ops and yields soon after (~420 tok/s, busy or
# idle).  Must be set before either OpenMP runtime starts (before torch is imported); user settings win.
if "OMP_WAIT_POLICY" not in _os.environ:
    _os.environ.setdefault("GOMP_SPINCOUNT", "30000")

# Keep freed forward-pass temporaries in the heap instead of faulting them in again every pass (see _malloc).
from kimi_local import _malloc  # noqa: E402,F401
