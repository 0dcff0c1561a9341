"""Checkpoint reader and model loader for the Hugging Face Kimi-K2 / DeepSeek-V3 layout.

A model directory holds ``config.json`` and either ``model.safetensors.index.json`` + shards or a single
``model.safetensors``.  The whole checkpoint is validated from the safetensors *headers* first (names,
shapes, dtypes, FP8 scales, shards present and long enough) so a bad checkpoint fails before a single
weight is read; then tensors are read with pread one at a time (an expert's three weights at once, through a
buffer each loader thread reuses, into the packed expert store), never the whole checkpoint at once.  A load that
fails part-way raises and leaves nothing behind: the half-built model is local to :func:`load_model` and is
dropped with the exception.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import re
import struct
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from kimi_local.config import ModelArgs
from kimi_local.errors import UserError
from kimi_local.fp8 import FP8BlockWeight, scale_grid_shape

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"

# safetensors dtype tag -> (torch dtype, element size)
_ST_DTYPES = {
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "BF16": (torch.bfloat16, 2),
    "F16": (torch.float16, 2),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "I32": (torch.int32, 4),
    "I64": (torch.int64, 8),
}
_FLOAT_TAGS = ("BF16", "F16", "F32")

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")

ProgressFn = Callable[[int, int], None]


class CheckpointError(UserError):
    """A model directory that cannot be loaded; the message names the tensor and the file."""


@dataclass
class TensorInfo:
    name: str
    file: str          # shard file name (relative to the model dir)
    dtype: str         # safetensors tag, e.g. "F8_E4M3"
    shape: tuple
    offset: int        # absolute byte offset of the data in the file
    nbytes: int


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
    """Parse a safetensors header without touching tensor data; checks the file holds all the data."""
    fname = os.path.basename(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{fname}: truncated safetensors file (no header)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen <= 0 or 8 + hlen > size or hlen > 100 * 2**20:
                raise CheckpointError(f"{fname}: corrupt safetensors header (header length {hlen}, file size {size})")
            header = json.loads(f.read(hlen).decode("utf-8"))
    except OSError as e:
        raise CheckpointError(f"{fname}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{fname}: corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{fname}: corrupt safetensors header")
    base = 8 + hlen
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            tag, shape, (start, end) = meta["dtype"], tuple(int(s) for s in meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{fname}: corrupt header entry for tensor '{name}'") from None
        if tag not in _ST_DTYPES:
            raise CheckpointError(f"tensor '{name}' in {fname}: unsupported dtype {tag}")
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * _ST_DTYPES[tag][1] or start < 0:
            raise CheckpointError(f"tensor '{name}' in {fname}: header byte range does not match shape {list(shape)} {tag}")
        if base + end > size:
            raise CheckpointError(
                f"tensor '{name}' in {fname}: file is truncated (needs {base + end} bytes, has {size})")
        out[name] = TensorInfo(name, fname, tag, shape, base + start, end - start)
    return out


class CheckpointReader:
    """Resolves tensor names to shards via the index and reads tensors lazily (pread, one at a time).

    ``tensors`` (from an earlier reader) skips parsing the index and headers again.
    """

    def __init__(self, model_dir: str, tensors: Optional[dict[str, TensorInfo]] = None):
        self.model_dir = model_dir
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()
        if tensors is not None:
            self.tensors = tensors
            return
        index_path = os.path.join(model_dir, INDEX_NAME)
        single_path = os.path.join(model_dir, SINGLE_NAME)
        self.tensors: dict[str, TensorInfo] = {}
        if os.path.isfile(index_path):
            try:
                with open(index_path, "r", encoding="utf-8") as f:
                    index = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{INDEX_NAME}: malformed JSON ({e})") from None
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
                raise CheckpointError(f"{INDEX_NAME}: 'weight_map' must be an object mapping tensor names to shard files")
            headers: dict[str, dict[str, TensorInfo]] = {}
            for shard in sorted(set(wm.values())):
                path = os.path.join(model_dir, shard)
                if os.path.sep in os.path.normpath(shard) or shard.startswith(".."):
                    raise CheckpointError(f"{INDEX_NAME}: shard name '{shard}' must be a plain file name")
                if not os.path.isfile(path):
                    first = next(k for k, v in wm.items() if v == shard)
                    raise CheckpointError(f"missing shard {shard} (listed in {INDEX_NAME}, holds e.g. '{first}')")
                headers[shard] = read_safetensors_header(path)
            for name, shard in wm.items():
                info = headers[shard].get(name)
                if info is None:
                    raise CheckpointError(f"tensor '{name}' is mapped to {shard} by {INDEX_NAME} but is not in that file")
                self.tensors[name] = info
        elif os.path.isfile(single_path):
            self.tensors = read_safetensors_header(single_path)
        else:
            raise CheckpointError(f"{model_dir}: no {INDEX_NAME} or {SINGLE_NAME} found")

    def _fd(self, file: str) -> int:
        with self._lock:
            fd = self._open.get(file)
            if fd is None:
                fd = os.open(os.path.join(self.model_dir, file), os.O_RDONLY)
                self._open[file] = fd
            return fd

    def read_into(self, name: str, view: memoryview, drop_cache: bool = False) -> None:
        """pread tensor ``name``'s bytes into ``view`` (exactly its size); ``drop_cache`` then evicts them
        from the page cache (the disk tier's RAM budget must be real, not hidden there)."""
        info = self.tensors[name]
        fd, got = self._fd(info.file), 0
        while got < info.nbytes:
            n = os.preadv(fd, [view[got:]], info.offset + got)
            if n <= 0:
                raise CheckpointError(f"tensor '{name}' in {info.file}: short read (file changed or truncated)")
            got += n
        if drop_cache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, info.offset, info.nbytes, os.POSIX_FADV_DONTNEED)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with pread into fresh memory: one copy, and no file mapping left behind in
        this process (mmap'd shards would count the whole checkpoint in its RSS)."""
        info = self.tensors[name]
        t = torch.empty(info.shape, dtype=_ST_DTYPES[info.dtype][0])
        if info.nbytes:
            self.read_into(name, memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B"))
        return t

    def close(self) -> None:
        with self._lock:
            for fd in self._open.values():
                os.close(fd)
            self._open.clear()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ----------------------------------------------------------------------------------------- load plan

@dataclass
class PlanItem:
    name: str                         # weight tensor name
    kind: str                         # "param" | "expert"
    shape: tuple
    scale: Optional[str] = None       # name of its _scale_inv when the weight is FP8
    layer: int = -1
    expert: int = -1
    proj: str = ""


def expected_expert_names(args: ModelArgs) -> Iterator[tuple[str, int, int, str, tuple]]:
    D, I = args.hidden_size, args.moe_intermediate_size
    shapes = {"gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}
    for L in args.moe_layer_ids:
        for e in range(args.n_routed_experts):
            for proj, shape in shapes.items():
                yield f"model.layers.{L}.mlp.experts.{e}.{proj}.weight", L, e, proj, shape


def build_plan(reader: CheckpointReader, args: ModelArgs, param_shapes: dict[str, tuple]) -> list[PlanItem]:
    """Match checkpoint tensors against what the model needs; every mismatch is a CheckpointError."""
    block = args.weight_block_size
    tensors = reader.tensors
    used: set[str] = set()
    plan: list[PlanItem] = []

    def where(name: str) -> str:
        return tensors[name].file

    def add_weight(name: str, shape: tuple, kind: str, fp8_ok: bool, **kw) -> None:
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"missing tensor '{name}' (shape {list(shape)}) in {reader.model_dir}")
        if info.shape != tuple(shape):
            raise CheckpointError(f"tensor '{name}' in {where(name)}: shape {list(info.shape)}, expected {list(shape)}")
        used.add(name)
        scale_name = name + SCALE_SUFFIX
        scale = None
        if _ST_DTYPES[info.dtype][1] == 1:  # FP8 iff 1-byte elements *and* a _scale_inv beside it
            if scale_name not in tensors:
                raise CheckpointError(f"tensor '{name}' in {where(name)} is FP8 ({info.dtype}) but has no '{scale_name}'")
            if not fp8_ok:
                raise CheckpointError(f"tensor '{name}' in {where(name)} must not be FP8")
            if info.dtype != "F8_E4M3":
                raise CheckpointError(f"tensor '{name}' in {where(name)}: dtype {info.dtype}, expected F8_E4M3")
            s = tensors[scale_name]
            want = scale_grid_shape(tuple(shape), block)
            if s.shape != want:
                raise CheckpointError(f"tensor '{scale_name}' in {where(scale_name)}: shape {list(s.shape)}, "
                                      f"expected {list(want)} for a {list(shape)} weight in {block[0]}x{block[1]} blocks")
            if s.dtype != "F32":
                raise CheckpointError(f"tensor '{scale_name}' in {where(scale_name)}: dtype {s.dtype}, expected F32")
            used.add(scale_name)
            scale = scale_name
        elif info.dtype not in _FLOAT_TAGS:
            raise CheckpointError(f"tensor '{name}' in {where(name)}: dtype {info.dtype}, expected BF16/F16/F32 or F8_E4M3")
        plan.append(PlanItem(name, kind, tuple(shape), scale, **kw))

    linear_re = re.compile(r"\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$")
    for name, shape in param_shapes.items():
        if name.endswith("e_score_correction_bias"):
            info = tensors.get(name)
            if info is not None and info.dtype not in _FLOAT_TAGS:
                raise CheckpointError(f"tensor '{name}' in {where(name)}: dtype {info.dtype}, expected F32")
        add_weight(name, shape, "param", fp8_ok=bool(linear_re.search(name)))
    for name, L, e, proj, shape in expected_expert_names(args):
        add_weight(name, shape, "expert", fp8_ok=True, layer=L, expert=e, proj=proj)

    # Multi-token-prediction layers (DeepSeek-V3 ships one as layer 61) are recognised and skipped.
    mtp = range(args.num_hidden_layers, args.num_hidden_layers + args.num_nextn_predict_layers)
    unexpected = []
    for name in tensors:
        if name in used:
            continue
        m = _LAYER_RE.match(name)
        if m and int(m.group(1)) in mtp:
            continue
        unexpected.append(name)
    if unexpected:
        extra = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor '{unexpected[0]}' in {where(unexpected[0])}{extra}")
    # Read in file order so a cold load streams each shard sequentially.
    plan.sort(key=lambda p: (tensors[p.name].file, tensors[p.name].offset))
    return plan


# ----------------------------------------------------------------------------------------- loading

def _set_param(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, leaf, torch.nn.Parameter(value, requires_grad=False))


def read_weight(reader: CheckpointReader, item: PlanItem, block) -> object:
    """The tensor of a plan item: an FP8BlockWeight for FP8 weights, else the plain tensor."""
    t = reader.get(item.name)
    if item.scale is None:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"tensor '{item.name}' in {reader.tensors[item.name].file} contains NaN or inf")
        return t
    return FP8BlockWeight(t, read_scale(reader, item), block)


def read_scale(reader: CheckpointReader, item: PlanItem) -> torch.Tensor:
    """The float32 scale grid of an FP8 plan item; NaN or inf scales are a CheckpointError."""
    s = reader.get(item.scale).float()
    if not torch.isfinite(s).all():
        raise CheckpointError(f"tensor '{item.scale}' in {reader.tensors[item.scale].file} contains NaN or inf scales")
    return s


def make_experts(args: ModelArgs, backend):
    """The routed-expert implementation for a backend name ("numba" | "torch") or an object."""
    if not isinstance(backend, str):
        return backend
    if backend == "torch":
        from kimi_local.model import TorchRoutedExperts
        return TorchRoutedExperts()
    if backend == "numba":
        from kimi_local.offload.host_experts import NumbaRoutedExperts
        return NumbaRoutedExperts(args)
    raise UserError(f"unknown expert backend {backend!r} (choose numba or torch)")


def load_model(model_dir: str, *, device="cpu", dtype: torch.dtype = torch.bfloat16, expert_backend="numba",
               progress: Optional[ProgressFn] = None, load_threads: Optional[int] = None):
    """Load a Kimi-K2 / DeepSeek-V3 model directory.

    Non-expert FP8 weights are dequantised once into ``dtype`` on ``device``; routed experts stay FP8 and
    go to the expert backend ("numba" CPU kernels, "torch" reference, or an expert-store object).
    ``progress(done_bytes, total_bytes)`` is called as tensors are read.  Returns a ready KimiModel.
    """
    from kimi_local.model import KimiModel

    if not os.path.isdir(model_dir):
        raise CheckpointError(f"{model_dir}: not a directory")
    args = ModelArgs.from_model_dir(model_dir)
    reader = CheckpointReader(model_dir)
    experts = make_experts(args, expert_backend)
    with torch.device("meta"):
        model = KimiModel(args, experts)
    param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    plan = build_plan(reader, args, param_shapes)
    # Optional expert-store protocol (the offload runtime): where experts live on disk, and which of
    # them to read now (a RAM budget below the experts' size leaves the rest on disk until routed to).
    bind = getattr(experts, "bind_checkpoint", None)
    if bind is not None:
        bind(reader.tensors, model_dir)
    accepts = getattr(experts, "accepts", None)
    if accepts is not None:
        plan = [p for p in plan if p.kind != "expert" or accepts(p.layer, p.expert)]
    def nbytes(item: PlanItem) -> int:
        return reader.tensors[item.name].nbytes + (reader.tensors[item.scale].nbytes if item.scale else 0)

    total = sum(nbytes(p) for p in plan)
    done = 0
    block = args.weight_block_size
    t0 = time.perf_counter()
    lock = threading.Lock()

    def load_item(item: PlanItem) -> None:
        w = read_weight(reader, item, block)
        if item.kind == "expert":
            experts.add(item.layer, item.expert, item.proj, w)
        else:
            is_fp32 = item.name.endswith("e_score_correction_bias")
            if isinstance(w, FP8BlockWeight):
                if w.nan_codes():
                    raise CheckpointError(f"tensor '{item.name}' in {reader.tensors[item.name].file} holds "
                                          f"{w.nan_codes()} e4m3 NaN codes")
                t = w.dequantize(dtype).to(device)
            else:
                # copy=True: the parameter must own its memory, never alias the read buffer.
                t = w.to(device=device, dtype=torch.float32 if is_fp32 else dtype, copy=True)
            _set_param(model, item.name, t)
        advance(nbytes(item))

    def advance(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress is not None:
                progress(done, total)

    # An expert store that takes an expert's three FP8 projections at once (add_expert) gets one task per expert:
    # its weights are read into a buffer the thread reuses and its scales checked, then it packs them; a third of
    # the tasks (and of their Python overhead) of one per tensor, and no fresh read buffers.
    add_expert = getattr(experts, "add_expert", None)
    tasks: list = []
    if add_expert is not None:
        groups: dict = {}
        for item in plan:
            if item.kind == "expert" and item.scale is not None:
                groups.setdefault((item.layer, item.expert), {})[item.proj] = item
        entered = set()
        for item in plan:      # plan order (file, offset): an expert enters at the first of its tensors
            key = (item.layer, item.expert)
            if item.kind != "expert" or len(groups.get(key, ())) < 3:
                tasks.append(item)
            elif key not in entered:
                entered.add(key)
                tasks.append(groups[key])
    else:
        tasks = list(plan)

    scratch = threading.local()      # one reused read buffer per loader thread (warm memory, no allocation)

    def load_expert(parts: dict) -> None:
        items = [parts[p] for p in ("gate_proj", "up_proj", "down_proj")]
        first = items[0]
        sizes = [reader.tensors[i.name].nbytes for i in items]
        buf = getattr(scratch, "buf", None)
        if buf is None or buf.size < sum(sizes):
            buf = scratch.buf = np.empty(sum(sizes), np.uint8)
        arrays, off = [], 0
        for item, n in zip(items, sizes):
            s = read_scale(reader, item)
            q = buf[off: off + n]
            reader.read_into(item.name, memoryview(q))
            arrays += [q.reshape(reader.tensors[item.name].shape), s.numpy()]
            off += n
        add_expert(first.layer, first.expert, *arrays)
        advance(sum(nbytes(i) for i in items))

    def run(task) -> None:
        if isinstance(task, dict):
            load_expert(task)
        else:
            load_item(task)

    # Reads (pread), dequantisation and expert packing release the GIL: a few threads overlap them.
    # In-flight memory stays at one tensor (or expert) per thread.
    workers = max(1, min(load_threads or torch.get_num_threads(), 8))
    try:
        if workers == 1:
            for task in tasks:
                run(task)
        else:
            with cf.ThreadPoolExecutor(workers, thread_name_prefix="kimi-load") as pool:
                futures = [pool.submit(run, task) for task in tasks]
                try:
                    for fut in cf.as_completed(futures):
                        fut.result()          # the first failure stops the load
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
        finalize = getattr(experts, "finalize", None)
        if finalize is not None:
            finalize()
    finally:
        reader.close()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # cannot happen when the plan covers every parameter; a guard against future drift
        raise CheckpointError(f"parameter '{left[0]}' was not filled by the checkpoint")
    attach = getattr(experts, "attach_model", None)
    if attach is not None:
        attach(model)
    model.fuse_projections()
    if torch.device(device).type == "cpu":
        from kimi_local.cpu_kernels import attention, norm, router
        norm.install(model)
        router.install(model)
        attention.install(model)
    model.load_seconds = time.perf_counter() - t0
    model.load_bytes = total
    model.eval()
    return model
