"""CPU kernels: Numba block-FP8 routed-expert compute (fp8_moe), its benchmark (bench) and the DRAM
read-bandwidth ceiling (membw)."""

from .fp8_moe import (PackedExperts, fast_path_available, get_num_threads, get_precision, moe_forward,
                      moe_forward_ref, set_num_threads, set_precision, warmup)

__all__ = ["PackedExperts", "moe_forward", "moe_forward_ref", "set_num_threads", "get_num_threads", "warmup",
           "set_precision", "get_precision", "fast_path_available"]
