"""Device and precision setup for the networks: the one place that decides what CUDA gets and the CPU does not.

- Precision (``--dtype``): ``fp32`` or ``bf16`` (autocast). Unset, it is bf16 on CUDA for the diffusion
  UNets and IDM (the IDM spec trains in bf16; DR2's code names half precision as a speed control) and
  fp32 elsewhere. bf16 on a device other than CUDA is refused in one line: the CPU always runs fp32, so
  its bytes stay what they are. Scoring networks stay fp32 (their values are checked for parity with
  pyiqa and feed fixed thresholds).
- On CUDA: TF32 matmuls and cuDNN convolutions, and ``torch.compile`` on request (``--compile``, for the
  fixed-shape UNets; refused elsewhere). The UNets stay in the default (contiguous) layout: on an H200,
  channels_last made the eager ADM-256 and IDM-512 forward 1.35-1.39x slower, in bf16 and fp32 alike (their
  GroupNorm-heavy blocks; README, GPU rows).
- Randomness: one ``torch.Generator`` per image, on the CUDA device when the images are there (noise is
  drawn where it is used, no host copy), else on the CPU. An image's noise depends only on its seed, never
  on its batch; on the CPU, where the UNets also see one image at a time (:func:`unet_call`), so do its
  bytes. On CUDA the UNet runs the whole batch, whose kernels may still move the last bits with the batch
  size. A CUDA generator's stream differs from the CPU's, so GPU bytes differ from CPU bytes (as they
  already did through the kernels).
- Default batch on CUDA from free device memory (:func:`default_batch_size`); unchanged on the CPU.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

DTYPES = ("fp32", "bf16")
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16}
T, R = TypeVar("T"), TypeVar("R")


class DeviceError(ValueError):
    """A precision or compile option the device cannot honour. One line."""


def resolve_dtype(dtype: str | None, device: torch.device) -> str:
    """The precision a run uses: the one asked for, else bf16 on CUDA and fp32 elsewhere."""
    if dtype is None:
        return "bf16" if device.type == "cuda" else "fp32"
    if dtype not in DTYPES:
        raise DeviceError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if dtype == "bf16" and device.type != "cuda":
        raise DeviceError(f"--dtype bf16 needs a CUDA device (this run uses {device.type}, which always runs fp32); "
                          f"drop --dtype or pass --dtype fp32")
    return dtype


def autocast_dtype(dtype: str) -> torch.dtype | None:
    """The autocast dtype of a precision name (None: plain fp32)."""
    return _AUTOCAST[dtype]


def check_compile(compile: bool, device: torch.device) -> None:
    if compile and device.type != "cuda":
        raise DeviceError(f"--compile needs a CUDA device (this run uses {device.type})")


def configure_backends(device: torch.device) -> torch.device:
    """TF32 for fp32 matmuls and convolutions on CUDA (10-bit mantissa inputs, fp32 accumulation).
    Returns ``device``."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def prepare_unet(unet: torch.nn.Module, device) -> torch.nn.Module:
    """Move a UNet to ``device`` for inference."""
    return unet.to(torch.device(device)).eval()


_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def compiled(module: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(module)``, built once per module (recompiles only when the input shape changes)."""
    if module not in _COMPILED:
        _COMPILED[module] = torch.compile(module, dynamic=False)
    return _COMPILED[module]


def run_unet(unet: torch.nn.Module, dtype: torch.dtype | None, *args) -> torch.Tensor:
    """``unet(*args).sample`` in float32, under autocast when ``dtype`` asks for it."""
    if dtype is None or dtype == torch.float32:
        return unet(*args).sample
    with torch.autocast(device_type=args[0].device.type, dtype=dtype):
        return unet(*args).sample.float()


def unet_call(unet: torch.nn.Module, dtype: torch.dtype | None, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:func:`run_unet` on a batch: whole on an accelerator (throughput; there, bytes can depend on the batch),
    one image at a time in batch order on the CPU. The CPU's conv and matmul kernels depend on the batch size
    (measured: an image alone and in a batch of 5 differ by 2e-6 in a diffusion UNet's output) and a last-ulp
    difference flips a rounded 8-bit pixel near .5; per-image calls make an image's bytes independent of its
    companions, at no throughput cost on a compute-bound CPU."""
    if x.device.type != "cpu":
        return run_unet(unet, dtype, x, t)
    return torch.cat(lane_map(lambda b: run_unet(unet, dtype, x[b : b + 1], t[b : b + 1]), x.shape[0]))


# ------------------------------------------------------------------------------ CPU lanes

_lanes = 1
_lane_pool: ThreadPoolExecutor | None = None  # shared by every caller; each call bounds its own share
_lane_guard = threading.Lock()
_in_lane = threading.local()


def set_cpu_lanes(lanes: int) -> None:
    """How many items one :func:`lane_imap` call may run at once on the CPU: the cores that the shards running
    in this process leave idle (flows/threads.py; 1 until a stage sets it). Read at each call."""
    global _lanes
    _lanes = max(1, int(lanes))


def get_cpu_lanes() -> int:
    """The lanes :func:`set_cpu_lanes` last set."""
    return _lanes


def lane_map(fn: Callable[[int], R], n: int) -> list[R]:
    """``[fn(0), ..., fn(n - 1)]`` for per-image network calls on the CPU: in turn, or spread over the CPU lanes
    (:func:`set_cpu_lanes`) where a shard has idle cores beside it. Each call runs on the process's intra-op
    threads as it would in turn, so an image's bytes do not depend on the lanes (a network's CPU kernels do
    depend on the intra-op thread count, which the stage index records)."""
    return list(lane_imap(fn, range(n)))


def lane_imap(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn(item)`` for each item, in order: in turn, or up to the CPU lanes at once, the next item starting as
    soon as one is done (at most two per lane waiting to be yielded). Each call keeps its caller's intra-op
    threads, grad and inference mode; a call from inside a lane runs its own calls in turn."""
    lanes = _lanes
    if lanes < 2 or getattr(_in_lane, "active", False):
        yield from map(fn, items)
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    threads = torch.get_num_threads()
    running = threading.Semaphore(lanes)

    def in_lane(item: T) -> R:
        _in_lane.active = True
        # a thread keeps the intra-op count torch had when it first ran a kernel; the caller's may be newer
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                return fn(item)
        finally:
            running.release()

    pool, pending = _pool(), deque()
    for item in items:
        if len(pending) == 2 * lanes:
            yield pending.popleft().result()
        running.acquire()
        pending.append(pool.submit(in_lane, item))
    while pending:
        yield pending.popleft().result()


def _pool() -> ThreadPoolExecutor:
    """Threads start as calls need them, one per core at most; each call bounds its share by its lanes."""
    global _lane_pool
    with _lane_guard:
        if _lane_pool is None:
            _lane_pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="bfr-cpu-lane")
        return _lane_pool


# ------------------------------------------------------------------------------ per-image randomness


def generators(seeds: Sequence[int], device) -> list[torch.Generator]:
    """One generator per seed, on ``device`` when it is CUDA, else on the CPU (see the module notes)."""
    device = torch.device(device)
    where = device if device.type == "cuda" else torch.device("cpu")
    return [torch.Generator(device=where).manual_seed(int(s)) for s in seeds]


def randn(shape, gens: Sequence[torch.Generator], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, *shape) standard normal noise on ``device``, image b drawn from ``gens[b]`` where that generator lives."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype, device=g.device) for g in gens]).to(device)


def rand(shape, gens: Sequence[torch.Generator], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, *shape) uniform [0, 1) draws, image b from ``gens[b]``."""
    return torch.stack([torch.rand(shape, generator=g, dtype=dtype, device=g.device) for g in gens]).to(device)


# ------------------------------------------------------------------------------ default batch

# Device memory one image needs while a UNet samples it, per pixel of the working resolution: an estimate
# with headroom (1 GiB for a 256x256 image in fp32, half in bf16; 4 GiB / 2 GiB at 512x512), to be checked
# against the peak memory that benchmarks/gpu.py prints.
BYTES_PER_PIXEL = {"fp32": 16 * 1024, "bf16": 8 * 1024}
MEMORY_FRACTION = 0.5  # of the free memory: other shard workers share the device
MAX_AUTO_BATCH = 32


def default_batch_size(device: torch.device, side: int, dtype: str, cpu_default: int) -> int:
    """The batch when none is given: ``cpu_default`` off CUDA; on CUDA as many ``side``² images as half the
    free device memory holds at :data:`BYTES_PER_PIXEL`, between 1 and :data:`MAX_AUTO_BATCH`."""
    if device.type != "cuda":
        return cpu_default
    free, _ = torch.cuda.mem_get_info(device)
    per_image = BYTES_PER_PIXEL[dtype] * side * side
    return max(1, min(MAX_AUTO_BATCH, int(free * MEMORY_FRACTION // per_image)))
