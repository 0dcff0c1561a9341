"""CPU kernels: Numba block-FP8 routed-expert compute (fp8_moe), MLA attention cores (attention), the router's
top-k selection (router), RMSNorm for small batches (norm), shared math (mathf) and intrinsics (simd), the
benchmark (bench) and the DRAM read-bandwidth ceiling (membw)."""

import glob as _glob
import hashlib as _hashlib
import os as _os

import numpy as _np
import torch as _torch


_SHARED = ("simd.py", "mathf.py")
_KERNEL_MODULES = ("fp8_moe.", "membw.", "norm.", "attention.", "router.", "mathf.")


def _drop_stale_numba_caches() -> None:
    """Numba's on-disk cache of a module is keyed on that module's own source file only, so after an edit of
    the shared helpers (the intrinsics in simd.py, the math in mathf.py) every kernel would silently keep its
    old machine code.  Keep a stamp of those files next to the caches and drop this package's caches when it
    changes."""
    here = _os.path.dirname(__file__)
    h = _hashlib.sha1()
    try:
        for shared in _SHARED:
            with open(_os.path.join(here, shared), "rb") as f:
                h.update(f.read())
    except OSError:
        return
    stamp = h.hexdigest()[:16]
    dirs = [_os.path.join(here, "__pycache__")]
    if _os.environ.get("NUMBA_CACHE_DIR"):
        dirs.append(_os.environ["NUMBA_CACHE_DIR"])
    for d in dirs:
        marker = _os.path.join(d, f"kimi-simd-{stamp}.stamp")
        if not _os.path.isdir(d) or _os.path.exists(marker):
            continue
        try:
            for pattern in ("*.nbi", "*.nbc"):
                for path in _glob.glob(_os.path.join(d, "**", pattern), recursive=True):
                    name = _os.path.basename(path)
                    if name.startswith(_KERNEL_MODULES):
                        _os.remove(path)
            for old in _glob.glob(_os.path.join(d, "kimi-simd-*.stamp")):
                _os.remove(old)
            open(marker, "w").close()
        except OSError:
            pass  # read-only install: nothing cached there by us either


_drop_stale_numba_caches()


def as_numpy(t):
    """A CPU tensor's memory as a numpy array, bf16 as its uint16 bits (a view: nothing is copied)."""
    if t.dtype == _torch.bfloat16:
        return t.view(_torch.int16).numpy().view(_np.uint16)
    return t.numpy()


def install_fast(model, module_type, make) -> int:
    """Set ``m.fast = make(m)`` on every ``module_type`` module of ``model`` (the modules' optional fast paths,
    whose own torch code stays their reference); returns how many got one."""
    n = 0
    for m in model.modules():
        if isinstance(m, module_type):
            m.fast = make(m)
            n += 1
    return n


from .fp8_moe import (PackedExperts, fast_path_available, get_num_threads, get_precision,  # noqa: E402
                      moe_forward, moe_forward_ref, precision_for, set_num_threads, set_precision, warmup)

__all__ = ["PackedExperts", "moe_forward", "moe_forward_ref", "set_num_threads", "get_num_threads", "warmup",
           "set_precision", "get_precision", "precision_for", "fast_path_available"]
