"""glibc malloc settings for a process that runs forward passes back to back.

Every forward pass allocates and frees the same temporaries (attention scores, activations, kernel scratch)
of a few MiB each.  glibc's defaults hand memory above its trim threshold (a few MiB, adapted at run time)
back to the kernel as soon as it is freed, so the next pass faults the same pages in again: ~1 µs per 4 KiB
page, and far more on virtual machines that back guest memory lazily.  Measured on a 2-core VM with the tiny
model: through torch's attention a 512-token prefill faulted ~6,200 pages per pass (0 tuned) and spent about
a third of its attention time on them; with the CPU attention kernels a 2040-token prefill still faulted
~36,000 pages per pass (10,000-14,000 tuned) and took 200-212 ms against 158-186 ms tuned.

:func:`tune` keeps freed memory in the heap instead: allocations up to ``MMAP_THRESHOLD`` come from the heap,
and up to ``TRIM_THRESHOLD`` of free heap top is kept for reuse rather than returned.  Larger blocks (model
weights, the packed experts, the KV cache) are still mmapped and returned on free.  A user who sets any of
glibc's own ``MALLOC_*_`` tunables in the environment keeps them: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 32 << 20   # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD = 64 << 20
TOP_PAD = 16 << 20

_USER_VARS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")


def tune() -> str:
    """Apply the settings; returns what was done ("applied", or why not)."""
    if os.environ.get("KIMI_LOCAL_MALLOC", "") == "default":
        return "skipped: KIMI_LOCAL_MALLOC=default"
    user = [v for v in _USER_VARS if os.environ.get(v)]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        user.append("GLIBC_TUNABLES")
    if user:   # the user's own malloc tuning (or another allocator preloaded) wins
        return f"skipped: {user[0]} is set"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "skipped: not glibc"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = all(libc.mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                       (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                       (M_TOP_PAD, TOP_PAD)))
    except (OSError, AttributeError) as e:
        return f"skipped: {e}"
    return "applied" if ok else "skipped: mallopt refused"


status = tune()
