"""The pipelined shard loop gives the serial loop's batches, rows and row order, and the same bytes."""

import numpy as np
import pytest
import torch

from bfr_models import storage
from bfr_models.imageio import encode_png
from bfr_models.manifest import ManifestWriter
from tasks.pipeline import ShardPipeline, host_uint8
from tasks.rows import decode_items, ok_row, same_size_batches, to_uint8, write_output
from tasks.shards import list_inputs, read_many
from tests.conftest import face_like, write_png


@pytest.fixture
def mixed_folder(tmp_path):
    """Two sizes interleaved and two unreadable files, so batches and rows could come out in another order."""
    folder = tmp_path / "mixed"
    for i in range(11):
        write_png(folder / f"f{i:02d}.png", face_like(i, size=32 if i % 3 else 48))
    (folder / "f04b.png").write_bytes(b"not an image")
    (folder / "f09b.png").write_bytes(b"")
    return folder


def serial_rows(items, batch_size: int, per_chunk: bool, out: str) -> tuple[list[list[str]], list[dict]]:
    """The loop the stages ran before the pipeline: decode, batch by size, encode and write one at a time."""
    writer, batches, rows = ManifestWriter(out), [], []
    chunks = [items[i : i + batch_size] for i in range(0, len(items), batch_size)] if per_chunk else [items]
    for chunk in chunks:
        decoded, errors = decode_items("test", chunk, read_many([i.uri for i in chunk]))
        rows += errors
        for batch in same_size_batches(decoded, batch_size):
            batches.append([item.uri for item, _, _, _ in batch])
            for item, parent_id, rgb, _ in batch:
                png = encode_png(255 - rgb)
                rows.append(ok_row("test", item, parent_id, write_output(writer, png, parent_id), rgb))
    return batches, rows


@pytest.mark.parametrize("per_chunk", [True, False])
def test_pipeline_matches_the_serial_loop(mixed_folder, tmp_path, per_chunk):
    items, _ = list_inputs(str(mixed_folder))
    want_batches, want_rows = serial_rows(items, 3, per_chunk, str(tmp_path / "serial"))
    writer, got_batches = ManifestWriter(str(tmp_path / "piped")), []
    with ShardPipeline("test", items, 3, per_chunk=per_chunk) as shard:
        for batch in shard.batches():
            got_batches.append([d.item.uri for d in batch])
            inverted = torch.from_numpy(np.stack([255 - d.rgb for d in batch])).permute(0, 3, 1, 2) / 255.0
            for d, rgb in zip(batch, host_uint8(inverted)):  # as a stage's device output comes back
                shard.write(d, writer, rgb, lambda out, d=d: ok_row("test", d.item, d.parent_id, out, d.rgb))
        got_rows = shard.rows()
    assert sorted(map(sorted, got_batches)) == sorted(map(sorted, want_batches))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "uri"} for r in rows]  # noqa: E731
    assert strip(got_rows) == strip(want_rows) and sum(r["status"] == "error" for r in got_rows) == 2
    for r in got_rows:  # the written files are the serial loop's bytes
        if r["uri"]:
            assert storage.sha256_hex(storage.read_bytes(r["uri"])) == r["sha256"]


def test_host_uint8_is_to_uint8_batched():
    x = torch.rand(3, 3, 17, 19, generator=torch.Generator().manual_seed(0))
    assert all(np.array_equal(a, to_uint8(b)) for a, b in zip(host_uint8(x), x))
    sizes = [torch.rand(3, 5, 7), torch.rand(3, 9, 4)]  # degradations may return images of different sizes
    assert [a.shape for a in host_uint8(sizes)] == [(5, 7, 3), (9, 4, 3)]
    devices = ["cuda"] if torch.cuda.is_available() else []
    for dev in devices:  # one pinned, non-blocking copy back: the same bytes as the CPU
        assert all(np.array_equal(a, to_uint8(b)) for a, b in zip(host_uint8(x.to(dev)), x))


def _shard_reporting_two_batches(key: str) -> int:
    """A stand-in shard task on a Dask worker: two batches done, as ShardPipeline reports them."""
    import os

    from tasks.runtime import report_images

    report_images(key, 8)
    report_images(key, 3)
    return os.getpid()


def test_progress_of_shards_on_dask_workers_reaches_the_driver_per_batch():
    """Under Dask the shards run in other processes: their per-batch counts reach the driver's progress bar
    as Dask events, not only when a shard ends."""
    import logging
    import os
    import time

    from distributed import Client, LocalCluster

    from tasks.runtime import watch_images

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, silence_logs=logging.WARNING,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        with watch_images(["a", "b"], client) as done:
            pid = client.submit(_shard_reporting_two_batches, "a", pure=False).result()
            deadline = time.monotonic() + 30
            while done("a") < 11 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert pid != os.getpid() and done("a") == 11 and done("b") == 0
        # nobody watches any more: the worker's reports go nowhere and nothing fails
        assert client.submit(_shard_reporting_two_batches, "a", pure=False).result() == pid


def _inside_together(first: torch.device, second: torch.device) -> bool:
    """Whether two shard threads can be inside device_turn of these devices at the same time."""
    import threading

    from tasks.runtime import device_turn

    met = threading.Barrier(2, timeout=2)
    results = []

    def shard(dev):
        with device_turn(dev):
            try:
                met.wait()  # returns only when the other thread is inside too
                results.append(True)
            except threading.BrokenBarrierError:
                results.append(False)

    threads = [threading.Thread(target=shard, args=(d,)) for d in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return all(results)


def test_shards_take_turns_on_a_gpu_batch_by_batch_and_not_on_the_cpu():
    """device_turn (no CUDA needed to name a device): the shards of a stage that runs a large network on each
    batch hold one GPU one batch at a time; another GPU, or the CPU, does not make them wait."""
    cuda0, cuda1, cpu = torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cpu")
    assert not _inside_together(cuda0, cuda0) and not _inside_together(cuda0, torch.device("cuda"))
    assert _inside_together(cuda0, cuda1)
    assert _inside_together(cpu, cpu)


def test_a_host_slot_is_taken_once_and_entered_again_inside_it():
    """The host's GPU slot (a Prefect global concurrency limit with one slot) is held by one command; a
    training run inside it (clean's next round, a subflow) must not wait for its own command's slot."""
    import uuid

    from prefect.client.orchestration import get_client

    from tasks.runtime import host_slot

    name = f"bfr-curate-test-{uuid.uuid4().hex[:8]}"

    def active() -> int:
        with get_client(sync_client=True) as client:
            return client.read_global_concurrency_limit_by_name(name).active_slots

    with host_slot(name):
        with host_slot(name):  # would wait forever (the test's timeout) if it took a second slot
            assert active() == 1
        assert active() == 1
    assert active() == 0
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == 1
        client.delete_global_concurrency_limit_by_name(name)
