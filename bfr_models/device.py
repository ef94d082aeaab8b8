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
_running_calls: "weakref.WeakSet[_Lane]" = weakref.WeakSet()  # the lane_imap calls under way


def set_cpu_lanes(lanes: int) -> None:
    """How many items one :func:`lane_imap` call may run at once on the CPU: the cores that the shards running
    in this process leave idle (flows/threads.py; 1 until a stage sets it). A call reads it when it starts, and
    a rise widens the calls under way: a stage's last shard takes the cores of the shards that finished."""
    global _lanes
    _lanes = max(1, int(lanes))
    with _lane_guard:
        for lane in list(_running_calls):
            lane.widen(_lanes)


def get_cpu_lanes() -> int:
    """The lanes :func:`set_cpu_lanes` last set."""
    return _lanes


def lane_map(fn: Callable[[int], R], n: int) -> list[R]:
    """``[fn(0), ..., fn(n - 1)]`` for per-image network calls on the CPU: in turn, or spread over the CPU lanes
    (:func:`set_cpu_lanes`) where a shard has idle cores beside it. Each call runs on the process's intra-op
    threads as it would in turn, so an image's bytes do not depend on the lanes (a network's CPU kernels do
    depend on the intra-op thread count, which the stage index records). Called from inside a lane, it shares
    its items with any lane of the outer call that falls idle (:func:`_share`)."""
    lane = getattr(_in_lane, "lane", None)
    if lane is not None:
        return _share(fn, n, lane)
    return list(lane_imap(fn, range(n)))


def split_on_lanes(fn: Callable[[slice], R], n: int, device) -> list[R]:
    """``fn(part)`` over a batch of ``n`` images, where ``part`` is a slice of the batch: the results of its parts
    in order. On the CPU with idle cores beside the shard (more than one lane), one part per lane, run at once;
    elsewhere one part, ``slice(0, n)``. Only for code in which an image does not depend on its batch
    (per-image generators, per-plane resizes, per-image UNet calls on the CPU): a lone shard's work between its
    network calls (a sampler's arithmetic, a degradation) then runs on every core, with the same bytes."""
    lanes = _lanes if torch.device(device).type == "cpu" else 1
    if lanes < 2 or n < 2:
        return [fn(slice(0, n))]
    size = -(-n // min(lanes, n))
    parts = [slice(start, min(start + size, n)) for start in range(0, n, size)]
    return lane_map(lambda k: fn(parts[k]), len(parts))


def lane_imap(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``fn(item)`` for each item, in order, on the lane pool: up to the CPU lanes at once (one at a time on one
    lane; more if :func:`set_cpu_lanes` rises meanwhile), the next item starting as soon as one is done (at
    most two per lane waiting to be yielded). Each call keeps its caller's intra-op threads, grad and
    inference mode; a call from inside a lane runs its own calls in turn."""
    if getattr(_in_lane, "lane", None) is not None:
        yield from map(fn, items)
        return
    lane = _Lane.of_caller(_lanes, threading.Semaphore(_lanes))
    with _lane_guard:
        _running_calls.add(lane)
    pool, pending = _pool(), deque()
    try:
        for item in items:
            if len(pending) >= 2 * lane.lanes:
                yield pending.popleft().result()
            lane.running.acquire()
            pending.append(pool.submit(lane.run, fn, item))
        while pending:
            yield pending.popleft().result()
    finally:
        with _lane_guard:
            _running_calls.discard(lane)


class _Lane:
    """What one :func:`lane_imap` call's lanes share: their bound, and the caller's torch state each call runs in."""

    def __init__(self, lanes: int, running: threading.Semaphore, threads: int, grad: bool, inference: bool):
        self.lanes, self.running, self.threads, self.grad, self.inference = lanes, running, threads, grad, inference

    @classmethod
    def of_caller(cls, lanes: int, running: threading.Semaphore) -> _Lane:
        """Lanes bound by ``running`` that run each call in this thread's torch state."""
        return cls(lanes, running, torch.get_num_threads(), torch.is_grad_enabled(), torch.is_inference_mode_enabled())

    def widen(self, lanes: int) -> None:
        """Up to ``lanes`` at once from now on (never fewer: the calls running keep their places)."""
        if lanes > self.lanes:
            self.running.release(lanes - self.lanes)
            self.lanes = lanes

    def run(self, fn: Callable[[T], R], item: T) -> R:
        """``fn(item)`` on a pool thread holding one of the bound's places, which it gives back when done."""
        _in_lane.lane = self
        # a thread keeps the intra-op count torch had when it first ran a kernel; the caller's may be newer
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode(self.inference), torch.set_grad_enabled(self.grad):
                return fn(item)
        finally:
            _in_lane.lane = None
            self.running.release()


def _share(fn: Callable[[int], R], n: int, lane: _Lane) -> list[R]:
    """:func:`lane_map` from inside a lane: the lane runs the items itself and, before each one, hands any place
    its outer call has free (never waiting for one) to a helper that runs items beside it, so a stage's last
    batches, fewer than its lanes, still use every lane. It waits only for items already running, never for a
    helper still queued: no call waits on the pool it occupies."""
    if n == 0:
        return []
    here = _Lane.of_caller(lane.lanes, lane.running)
    results: list = [None] * n
    errors: list[BaseException] = []
    taken = done = 0
    guard, all_done = threading.Lock(), threading.Event()

    def take() -> int | None:
        nonlocal taken
        with guard:
            if taken == n:
                return None
            taken += 1
            return taken - 1

    def run(i: int) -> None:
        nonlocal done
        try:
            results[i] = fn(i)
        except BaseException as e:  # raised by the caller once every item has ended
            errors.append(e)
        with guard:
            done += 1
            if done == n:
                all_done.set()

    def helper(_) -> None:
        while (i := take()) is not None:
            run(i)

    while (i := take()) is not None:
        if taken < n and lane.running.acquire(blocking=False):  # an item is left for a helper
            _pool().submit(here.run, helper, None)
        run(i)
    all_done.wait()
    if errors:
        raise errors[0]
    return results


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
