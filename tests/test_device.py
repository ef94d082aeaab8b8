"""bfr_models.device: the precision and compile choices per device, per-image generators, the default batch."""

from __future__ import annotations

import threading

import pytest
import torch

from bfr_models import device
from bfr_models.device import DeviceError

CPU = torch.device("cpu")


def test_cpu_runs_fp32_and_refuses_bf16_and_compile_in_one_line():
    assert device.resolve_dtype(None, CPU) == "fp32" and device.resolve_dtype("fp32", CPU) == "fp32"
    assert device.resolve_dtype(None, torch.device("cuda")) == "bf16"  # the CUDA default (decided without a GPU)
    for call, message in [(lambda: device.resolve_dtype("bf16", CPU), "--dtype bf16 needs a CUDA device"),
                          (lambda: device.resolve_dtype("fp16", CPU), "--dtype must be one of fp32, bf16"),
                          (lambda: device.check_compile(True, CPU), "--compile needs a CUDA device")]:
        with pytest.raises(DeviceError, match=message) as raised:
            call()
        assert "\n" not in str(raised.value)
    device.check_compile(False, CPU)


def test_gpu_benchmark_exits_cleanly_without_cuda_and_runs_every_row_dry(capsys):
    from benchmarks.gpu import main

    if not torch.cuda.is_available():
        assert main([]) == 0
        assert capsys.readouterr().out.strip().startswith("benchmarks/gpu.py: no CUDA device here")
    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    for stage in ("| pseudo-targets | small 32 px", "| clean (IDM) |", "| degrade |", "| NIQE |", "| MUSIQ |",
                  "| UNet forward | small prior, channels_last |"):
        assert stage in out, out
    assert "alone vs in a batch of 8 (DR2, small 64-px prior): fp32: 0 of 98304 uint8 values differ" in out
    assert "skipped" not in out and "failed:" not in out


def test_cpu_generators_draw_the_same_streams_as_before():
    # CPU bytes stay what they were: the generators are plain CPU generators seeded the same way
    gens = device.generators([3, 7], "cpu")
    assert all(g.device == CPU for g in gens)
    expected = torch.stack([torch.randn((2, 4, 4), generator=torch.Generator().manual_seed(s)) for s in (3, 7)])
    assert torch.equal(device.randn((2, 4, 4), gens, CPU), expected)


def test_default_batch_is_unchanged_off_cuda_and_unets_are_prepared_for_inference():
    assert device.default_batch_size(CPU, 512, "fp32", cpu_default=8) == 8
    unet = device.prepare_unet(torch.nn.Conv2d(3, 4, 3).train(), "cpu")
    assert unet.weight.is_contiguous() and not unet.training


@pytest.fixture
def lanes():
    yield device.set_cpu_lanes
    device.set_cpu_lanes(1)  # what a process has until a stage sets it


def test_lane_map_runs_images_at_once_in_the_callers_mode_and_in_turn_inside_a_lane(lanes):
    here = threading.current_thread().name
    lanes(2)
    met = threading.Barrier(2, timeout=30)  # broken unless two calls run at once

    def call(i):
        met.wait()
        name = threading.current_thread().name
        nested = device.lane_map(lambda j: threading.current_thread().name == name, 2)  # no lane is free
        met.wait()  # neither lane gives its place back before both nested calls are done
        return i, name != here, torch.is_grad_enabled(), torch.is_inference_mode_enabled(), nested

    with torch.inference_mode():
        assert device.lane_map(call, 2) == [(0, True, False, True, [True, True]), (1, True, False, True, [True, True])]
    with torch.no_grad():
        assert device.lane_map(lambda i: (torch.is_grad_enabled(), torch.is_inference_mode_enabled()), 2) == \
            [(False, False)] * 2


def test_a_call_inside_a_lane_shares_its_items_with_a_lane_left_free_in_its_mode_and_order(lanes):
    lanes(2)
    met = threading.Barrier(2, timeout=30)  # broken unless the lone lane's two items run at once

    def lone(_):
        with torch.no_grad():  # the helper runs in the mode of the nested call, not of the outer one
            return device.lane_map(lambda j: (j, met.wait() >= 0, torch.is_grad_enabled()), 2)

    assert device.lane_map(lone, 1) == [[(0, True, False), (1, True, False)]]

    def fails(j):
        if j == 3:
            raise ValueError("image 3")
        return j

    with pytest.raises(ValueError, match="image 3"):
        device.lane_map(lambda _: device.lane_map(fails, 6), 1)


def test_lanes_run_on_the_callers_intra_op_threads_whatever_their_threads_ran_before(lanes):
    before = torch.get_num_threads()
    lanes(2)
    try:
        torch.set_num_threads(3)
        assert device.lane_map(lambda i: torch.get_num_threads(), 4) == [3] * 4  # the pool's threads start here
        torch.set_num_threads(1)  # a later stage's rule: the same threads must follow
        assert device.lane_map(lambda i: torch.get_num_threads(), 4) == [1] * 4
    finally:
        torch.set_num_threads(before)


def test_calls_and_their_helpers_run_at_most_the_lanes_at_once(lanes):
    import os
    import time

    now, most, guard = [0], [0], threading.Lock()

    def call(i):
        with guard:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.01)  # sleeping releases the GIL: calls overlap where the lanes allow
        with guard:
            now[0] -= 1
        return i

    lanes(1)
    assert device.lane_map(call, 4) == list(range(4)) and most[0] == 1
    lanes(2)
    assert device.lane_map(call, 8) == list(range(8)) and most[0] == min(2, os.cpu_count() or 1)
    most[0] = 0
    batches = device.lane_map(lambda b: device.lane_map(call, 5 - 2 * b), 3)  # 5, 3 and 1 images, nested
    assert batches == [list(range(5)), list(range(3)), [0]] and most[0] == min(2, os.cpu_count() or 1)


def test_a_call_under_way_takes_the_lanes_a_stage_frees(lanes):
    """A stage raises the lanes when a shard finishes (flows/threads.py): the last shard's score call, started
    on one lane, then runs two batches at once."""
    lanes(1)
    met = threading.Barrier(2, timeout=10)  # broken unless items 1 and 2 run at once

    def batch(i):
        if i == 0:
            lanes(2)  # a neighbouring shard finished
            return 0
        return met.wait() >= 0

    assert list(device.lane_imap(batch, range(3))) == [0, True, True]


def test_a_unet_gives_the_same_bits_in_turn_and_on_two_lanes(lanes):
    from bfr_models.diffusion.train import PriorTrainConfig, small_unet

    torch.manual_seed(0)
    unet = small_unet(PriorTrainConfig(resolution=16, channels=(8, 16))).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)
    x, t = torch.randn(4, 3, 16, 16), torch.tensor([10, 200, 500, 900])
    with torch.inference_mode():
        lanes(1)
        in_turn = device.unet_call(unet, None, x, t)
        lanes(2)
        on_lanes = device.unet_call(unet, None, x, t)
    assert in_turn.abs().sum() > 0 and torch.equal(in_turn, on_lanes)


def test_a_batch_is_split_into_one_part_per_lane_on_the_cpu_only(lanes):
    def part(s):
        return s.start, s.stop

    lanes(1)
    assert device.split_on_lanes(part, 10, "cpu") == [(0, 10)]
    lanes(2)
    assert device.split_on_lanes(part, 10, "cuda") == [(0, 10)]
    met = threading.Barrier(2, timeout=30)  # broken unless the two parts run at once
    assert device.split_on_lanes(lambda s: (met.wait(), part(s))[1], 9, "cpu") == [(0, 5), (5, 9)]
    assert device.split_on_lanes(part, 1, "cpu") == [(0, 1)]
    lanes(4)
    assert device.split_on_lanes(part, 3, "cpu") == [(0, 1), (1, 2), (2, 3)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_noise_is_drawn_on_the_device_per_image():
    cuda = torch.device("cuda")
    gens = device.generators([5, 6, 7], cuda)
    assert all(g.device.type == "cuda" for g in gens)
    batch = device.randn((3, 16, 16), gens, cuda)
    alone = device.randn((3, 16, 16), device.generators([6], cuda), cuda)
    assert batch.device.type == "cuda" and torch.equal(batch[1:2], alone)
    assert device.default_batch_size(cuda, 256, "bf16", cpu_default=8) >= 1
