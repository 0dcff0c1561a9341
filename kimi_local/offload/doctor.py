"""``kimi-local doctor``: check this machine for running Kimi-K2 and say what will hurt, with a fix.

Each check gives a value, a verdict (ok / warn / bad) and, where something will hurt, a fix.  Nothing here needs
a GPU or the model's weights; RAM needs are computed for Kimi-K2 unless ``--model`` names another config.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from kimi_local.config import ModelArgs
from kimi_local.offload.placement import GiB, MiB, format_bytes, kimi_k2_args, model_sizes, parse_size
from kimi_local.sysinfo import cpuinfo

VERDICTS = ("ok", "warn", "bad")


@dataclass
class Check:
    """One line of the report."""

    label: str
    value: str
    verdict: str = "ok"
    fix: str = ""
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- CPU


# Our name -> /proc/cpuinfo flag.
ISA_FLAGS = {
    "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx512f": "avx512f", "avx512bw": "avx512bw",
    "avx512_vbmi": "avx512vbmi", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16", "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8",
}


def check_cpu() -> Check:
    """CPU model and the ISA features the FP8 expert kernels can use (anchors §7)."""
    name, flags = cpuinfo()
    isa = {k: (v in flags) for k, v in ISA_FLAGS.items()}
    have = [k for k, v in isa.items() if v and k not in ("fma", "f16c")]
    value = f"{name}; " + (", ".join(have) if have else "no AVX2/AVX-512")
    if not flags:
        return Check("CPU / ISA", f"{name}; ISA flags unreadable", "warn",
                     "could not read /proc/cpuinfo; kernels will pick the portable path", {"model": name, "isa": isa})
    if isa["avx512bw"] and isa["avx512_vbmi"]:
        return Check("CPU / ISA", value, "ok", "", {"model": name, "isa": isa})
    if isa["avx2"]:
        return Check("CPU / ISA", value, "warn",
                     "no AVX-512 VBMI: FP8 experts decode through the slower AVX2 LUT path; "
                     "Zen 4/5 or Sapphire Rapids and later decode ~2x faster", {"model": name, "isa": isa})
    return Check("CPU / ISA", value, "bad", "no AVX2: CPU expert kernels will be very slow; use an x86-64-v3 "
                 "or newer CPU", {"model": name, "isa": isa})


def check_cores() -> Check:
    """Physical vs logical cores and the CPUs this process may run on."""
    import psutil

    logical = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = logical
    details = {"physical": physical, "logical": logical, "allowed": allowed}
    value = f"{physical} physical, {logical} logical, {allowed} usable by this process"
    fixes, verdict = [], "ok"
    if logical > physical:
        verdict = "warn"
        fixes.append(f"hyperthreads counted as cores: run {physical} compute threads, not {logical} "
                     f"(NUMBA_NUM_THREADS={physical}); two threads per core only contend for the vector units")
    if allowed < logical:
        verdict = "warn"
        fixes.append(f"this process may use only {allowed} of {logical} CPUs (taskset/cgroup); widen the affinity")
    if physical < 8:
        verdict = "warn"
        fixes.append(f"{physical} cores cannot saturate workstation RAM bandwidth; routed experts need 16+ cores "
                     "per socket to reach the decode ceiling")
    return Check("cores", value, verdict, "; ".join(fixes), details)


def check_numa() -> Check:
    """NUMA nodes: more than one means experts may be read across sockets."""
    base = "/sys/devices/system/node"
    try:
        nodes = sorted(d for d in os.listdir(base) if d.startswith("node") and d[4:].isdigit())
    except OSError:
        nodes = []
    n = len(nodes) or 1
    if n == 1:
        return Check("NUMA nodes", "1", "ok", "", {"nodes": n})
    return Check("NUMA nodes", str(n), "warn",
                 "experts will be read across sockets at a fraction of local bandwidth: run under "
                 "`numactl --interleave=all`, or `numactl -N 0 -m 0` if one node's RAM holds the experts",
                 {"nodes": n})


# ---------------------------------------------------------------------------------------------- memory


def check_ram(model: ModelArgs, model_name: str, gpu_present: bool) -> Check:
    """Total/available RAM against what keeping every routed expert resident needs."""
    import psutil

    vm = psutil.virtual_memory()
    sizes = model_sizes(model)
    need = sizes.routed_total + 8 * GiB + (0 if gpu_present else sizes.nonrouted_total)
    value = f"{format_bytes(vm.total, False)} total, {format_bytes(vm.available, False)} available"
    details = {"total": int(vm.total), "available": int(vm.available), "needed_all_resident": need,
               "model": model_name}
    if vm.total >= need:
        return Check("RAM", value, "ok", "", details)
    resident = max(0, vm.total - 8 * GiB - (0 if gpu_present else sizes.nonrouted_total)) / sizes.routed_total
    details["resident_fraction"] = resident
    fix = (f"{model_name} needs ~{format_bytes(need, False)} to keep all routed experts in RAM; here "
           f"{resident:.0%} would be resident and the rest read from disk on every miss (disk tier)")
    return Check("RAM", value, "warn" if resident >= 0.25 else "bad", fix, details)


def check_memlock(model: ModelArgs, gpu_present: bool) -> Check:
    """The locked-memory limit (ulimit -l), which caps mlock'd and some pinned host memory."""
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    unlimited = soft == resource.RLIM_INFINITY
    value = "unlimited" if unlimited else format_bytes(soft, False)
    details = {"soft": None if unlimited else soft, "hard": None if hard == resource.RLIM_INFINITY else hard}
    need = model_sizes(model).routed_total
    if unlimited or soft >= need:
        return Check("locked memory (ulimit -l)", value, "ok", "", details)
    fix = ("raise it: `ulimit -l unlimited` in the launching shell, `* - memlock unlimited` in "
           "/etc/security/limits.conf, or `docker run --ulimit memlock=-1`")
    if not gpu_present:
        return Check("locked memory (ulimit -l)", value + " (no CUDA: host memory is not pinned)", "ok",
                     "", details)
    return Check("locked memory (ulimit -l)", value, "warn",
                 f"below the {format_bytes(need, False)} of routed experts: pinning the expert RAM can fail "
                 f"and fall back to pageable copies (slower GPU refills); " + fix, details)


def check_hugepages() -> Check:
    """Transparent huge pages: 'never' means more TLB misses while streaming a terabyte of experts."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", "r", encoding="utf-8") as f:
            text = f.read().strip()
    except OSError:
        return Check("transparent huge pages", "unknown", "ok", "", {"mode": None})
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else text
    if mode in ("always", "madvise"):
        return Check("transparent huge pages", mode, "ok", "", {"mode": mode})
    return Check("transparent huge pages", mode, "warn",
                 "enable them: `echo madvise | sudo tee /sys/kernel/mm/transparent_hugepage/enabled`",
                 {"mode": mode})


# ---------------------------------------------------------------------------------------------- GPU, versions


def check_gpu() -> Check:
    """CUDA devices with their free/total memory; none is a warning, not an error."""
    try:
        import torch
    except ImportError:
        return Check("GPU", "torch not installed", "bad", "install torch (see README)", {"devices": []})
    if not torch.cuda.is_available():
        nvidia = os.path.exists("/dev/nvidia0")
        fix = ("an NVIDIA device exists but this torch has no CUDA: install the CUDA build of torch" if nvidia
               else "no CUDA GPU: attention and all experts run on the CPU (the GPU expert cache is off)")
        return Check("GPU", "none", "warn", fix, {"devices": []})
    devices = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        cap = torch.cuda.get_device_capability(i)
        devices.append({"index": i, "name": torch.cuda.get_device_name(i), "free": int(free), "total": int(total),
                        "capability": f"{cap[0]}.{cap[1]}"})
    value = "; ".join(f"{d['name']} ({format_bytes(d['free'], False)} free of {format_bytes(d['total'], False)},"
                      f" sm_{d['capability'].replace('.', '')})" for d in devices)
    details = {"devices": devices}
    if devices and devices[0]["free"] < 16 * GiB:
        return Check("GPU", value, "warn", "under 16 GiB free: Kimi-K2's non-routed weights (~14 GB) plus KV will "
                     "not fit with any expert cache; `kimi-local plan` shows the split", details)
    return Check("GPU", value, "ok", "", details)


def check_versions() -> Check:
    """Python, torch, CUDA runtime, numpy and numba versions."""
    versions: dict[str, Optional[str]] = {"python": platform.python_version()}
    try:
        import torch
        versions["torch"] = torch.__version__
        versions["cuda"] = torch.version.cuda
    except ImportError:
        versions["torch"] = versions["cuda"] = None
    for mod in ("numpy", "numba"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    value = ", ".join(f"{k} {v or '-'}" for k, v in versions.items())
    missing = [k for k in ("torch", "numpy", "numba") if versions.get(k) is None]
    if missing:
        return Check("versions", value, "bad", f"install {', '.join(missing)} (`make install`)", versions)
    if sys.version_info < (3, 10):
        return Check("versions", value, "bad", "Python 3.10+ is required", versions)
    return Check("versions", value, "ok", "", versions)


def check_numba() -> Check:
    """Which Numba threading layers load here; workqueue alone is not safe for concurrent callers."""
    try:
        import numba
    except ImportError:
        return Check("Numba threading layer", "numba not installed", "bad", "pip install numba", {})
    available = []
    for layer, module in (("tbb", "tbbpool"), ("omp", "omppool"), ("workqueue", "workqueue")):
        try:
            __import__(f"numba.np.ufunc.{module}")
            available.append(layer)
        except Exception:  # a missing libtbb / libgomp raises ImportError or OSError
            pass
    configured = numba.config.THREADING_LAYER
    threads = numba.config.NUMBA_NUM_THREADS
    details = {"configured": configured, "available": available, "num_threads": threads}
    chosen = configured if configured in available else (available[0] if available else None)
    value = f"{chosen or 'none'} (configured: {configured}; loadable: {', '.join(available) or 'none'}), " \
            f"{threads} threads"
    details["chosen"] = chosen
    if chosen in ("tbb", "omp"):
        return Check("Numba threading layer", value, "ok", "", details)
    return Check("Numba threading layer", value, "warn",
                 "only the workqueue layer loads, and it is not thread-safe: expert kernels called from a worker "
                 "thread while another parallel region runs will abort; `pip install tbb` (or install libgomp)",
                 details)


def measure_wakeup_us(rounds: int = 200) -> float:
    """Median time for one sleeping thread to be woken and answer (half a ping-pong round trip between two
    threads that block on events), in microseconds."""
    import statistics
    import threading
    import time

    ping, pong = threading.Event(), threading.Event()
    times: list[float] = []

    def echo():
        for _ in range(rounds):
            ping.wait()
            ping.clear()
            pong.set()

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    for _ in range(rounds):
        time.sleep(0.0002)                     # let the other side go to sleep
        t0 = time.perf_counter()
        ping.set()
        pong.wait()
        times.append(time.perf_counter() - t0)
        pong.clear()
    t.join(timeout=1.0)
    return statistics.median(times) / 2 * 1e6


def check_thread_wait(env: Optional[dict] = None, wakeup_us: Optional[float] = None) -> Check:
    """How idle OpenMP threads (torch's and the Numba kernels' pools) wait, against this machine's measured
    thread wake-up time."""
    env = os.environ if env is None else env
    wake = measure_wakeup_us() if wakeup_us is None else wakeup_us
    policy = (env.get("OMP_WAIT_POLICY") or "").strip().upper()
    spin = (env.get("GOMP_SPINCOUNT") or "").strip().upper()
    details = {"OMP_WAIT_POLICY": policy or None, "GOMP_SPINCOUNT": spin or None, "wakeup_us": round(wake, 1)}
    value = f"OMP_WAIT_POLICY={policy or 'unset'}, GOMP_SPINCOUNT={spin or 'unset'}; thread wake-up {wake:.0f} us"
    if policy == "PASSIVE":
        return Check("OpenMP thread wait", value, "warn",
                     "PASSIVE makes every parallel op wake sleeping threads: decode measured 3-4x slower on a "
                     f"machine with ~100 us wake-ups (here {wake:.0f} us); unset OMP_WAIT_POLICY (kimi-local then "
                     "uses a short spin, GOMP_SPINCOUNT=30000)", details)
    if policy == "ACTIVE" or spin in ("INFINITE", "INFINITY") or (spin.isdigit() and int(spin) > 1_000_000):
        return Check("OpenMP thread wait", value, "warn",
                     "threads that spin for long steal cores from the other pool (torch vs the expert kernels): "
                     "decode measured ~2 tok/s on a busy 2-core machine; unset OMP_WAIT_POLICY / GOMP_SPINCOUNT",
                     details)
    return Check("OpenMP thread wait", value, "ok", "", details)


# ---------------------------------------------------------------------------------------------- disk


def measure_disk_read(path: str, max_bytes: int = 256 * MiB, max_seconds: float = 2.0) -> dict[str, Any]:
    """Sequential read speed at ``path`` (a file, or a directory: its largest file, else a temporary one).

    The file's cached pages are dropped first (``posix_fadvise DONTNEED``) so the figure is the disk's, not the
    page cache's; ``cold`` says whether that was possible.  Reads stop at ``max_bytes`` or ``max_seconds``.
    """
    target, temp = path, None
    if os.path.isdir(path):
        files = []
        for entry in os.scandir(path):
            try:
                if entry.is_file(follow_symlinks=True):
                    files.append((entry.stat().st_size, entry.path))
            except OSError:
                continue
        big = [f for f in files if f[0] >= min(max_bytes, 64 * MiB)]
        if big:
            target = max(big)[1]
        else:  # no large file to read: write one, flush it, then read it back cold
            fd, temp = tempfile.mkstemp(prefix=".kimi-local-disk-test-", dir=path)
            block = os.urandom(MiB)
            with os.fdopen(fd, "wb") as f:
                for _ in range(max(1, min(max_bytes, 64 * MiB) // MiB)):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
            target = temp
    elif not os.path.isfile(path):
        raise FileNotFoundError(path)
    try:
        fd = os.open(target, os.O_RDONLY)
        try:
            cold = True
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except (AttributeError, OSError):
                cold = False
            buf = bytearray(8 * MiB)
            view = memoryview(buf)
            total, t0 = 0, time.perf_counter()
            while total < max_bytes and time.perf_counter() - t0 < max_seconds:
                n = os.readv(fd, [view])
                if n <= 0:
                    break
                total += n
            elapsed = max(time.perf_counter() - t0, 1e-9)
        finally:
            os.close(fd)
    finally:
        if temp is not None:
            os.unlink(temp)
    return {"path": target if temp is None else path, "bytes": total, "seconds": elapsed,
            "bytes_per_s": total / elapsed, "cold": cold, "temporary_file": temp is not None}


def check_disk(path: str, max_bytes: int, max_seconds: float, model: ModelArgs) -> Check:
    """Disk read speed where the checkpoint lives: it bounds load time and the disk tier."""
    try:
        r = measure_disk_read(path, max_bytes, max_seconds)
    except OSError as e:
        return Check("disk read", f"{path}: {e.strerror or e}", "warn",
                     "pass a readable directory with --path (where the checkpoint will live)", {"path": path})
    bw = r["bytes_per_s"]
    value = f"{format_bytes(bw)}/s sequential at {r['path']} ({format_bytes(r['bytes'])} read" + \
            ("" if r["cold"] else ", page cache not dropped") + ")"
    routed = model_sizes(model).routed_total
    load_min = routed / bw / 60 if bw > 0 else float("inf")
    if bw >= 3e9:
        return Check("disk read", value, "ok", "", r)
    return Check("disk read", value, "warn",
                 f"reading {format_bytes(routed)} of routed experts takes ~{load_min:.0f} min at this speed, and "
                 f"the disk tier serves at most {bw / model_sizes(model).bytes_per_expert:.0f} experts/s: keep the "
                 f"checkpoint on a PCIe 4/5 NVMe drive (3-14 GB/s)", r)


# ---------------------------------------------------------------------------------------------- command


def collect(model_dir: Optional[str] = None, path: Optional[str] = None, disk_bytes: int = 256 * MiB,
            disk_seconds: float = 2.0, disk: bool = True) -> dict[str, Check]:
    """Run every check; ``model_dir`` sets the model the RAM needs are computed for (default Kimi-K2)."""
    if model_dir:
        model, model_name = ModelArgs.from_model_dir(model_dir), os.path.basename(os.path.normpath(model_dir))
    else:
        model, model_name = kimi_k2_args(), "Kimi-K2"
    checks: dict[str, Check] = {"cpu": check_cpu(), "cores": check_cores(), "numa": check_numa()}
    gpu = check_gpu()
    gpu_present = bool(gpu.details.get("devices"))
    checks["ram"] = check_ram(model, model_name, gpu_present)
    checks["memlock"] = check_memlock(model, gpu_present)
    checks["hugepages"] = check_hugepages()
    checks["gpu"] = gpu
    checks["versions"] = check_versions()
    checks["numba"] = check_numba()
    checks["threads"] = check_thread_wait()
    if disk:
        checks["disk"] = check_disk(path or model_dir or os.getcwd(), disk_bytes, disk_seconds, model)
    return checks


def worst(checks: dict[str, Check]) -> str:
    """The worst verdict among the checks."""
    return max((c.verdict for c in checks.values()), key=VERDICTS.index, default="ok")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``kimi-local doctor``."""
    parser.add_argument("--model", metavar="DIR", help="compute RAM needs for this model (default: Kimi-K2)")
    parser.add_argument("--path", metavar="DIR", help="where to measure disk read speed (default: --model or .)")
    parser.add_argument("--disk-bytes", default="256MiB", metavar="SIZE", help="read at most this much (256MiB)")
    parser.add_argument("--disk-seconds", type=float, default=2.0, metavar="S", help="read for at most S seconds")
    parser.add_argument("--no-disk", action="store_true", help="skip the disk read test")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 if any check is 'bad'")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the report; status 0 unless ``--strict`` and something is bad."""
    checks = collect(args.model, args.path, parse_size(args.disk_bytes, what="--disk-bytes"),
                     args.disk_seconds, not args.no_disk)
    overall = worst(checks)
    if args.json:
        print(json.dumps({"checks": {k: asdict(c) for k, c in checks.items()}, "worst": overall}, indent=2))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="kimi-local doctor", title_justify="left")
        for col in ("check", "value", "verdict", "fix"):
            table.add_column(col)
        colour = {"ok": "green", "warn": "yellow", "bad": "red"}
        for c in checks.values():
            table.add_row(c.label, c.value, f"[{colour[c.verdict]}]{c.verdict}[/]", c.fix)
        Console().print(table)
    return 1 if args.strict and overall == "bad" else 0
