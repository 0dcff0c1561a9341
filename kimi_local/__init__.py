"""kimi-local: run Kimi-K2-Instruct (DeepSeek-V3 architecture, block-FP8) on one workstation."""

import os as _os

__version__ = "0.1.0"

# torch and the Numba kernels each run an OpenMP thread pool.  With the default (spinning) wait policy
# an idle pool keeps its threads busy-waiting, stealing the cores the other pool needs: measured here,
# decode of the tiny model fell from ~350 to ~3 tok/s.  Passive waiting must be chosen before either
# OpenMP runtime starts, i.e. before torch is imported; a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
