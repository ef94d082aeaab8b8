"""Training streams its data: a data set larger than the memory the process may use still trains."""

import json
import multiprocessing
import subprocess
import sys
import textwrap

import numpy as np

from bfr_models.imageio import encode_png

N_IMAGES, SIZE = 1600, 128
DATASET_BYTES = N_IMAGES * 3 * SIZE * SIZE * 4  # what holding it as one float32 tensor needs: ~315 MB
HEADROOM = 250_000_000  # training this tiny prior itself grows the process by ~150 MB (model, optimizer, oneDNN)

# The child caps its data segment (RLIMIT_DATA: heap and private writable mappings) at what it uses after
# the imports plus HEADROOM, then trains with one (spawned) DataLoader worker, which inherits the cap. RLIMIT_AS would not do: torch reserves GBs of address space it
# never touches. The child also reports its peak RSS growth (getrusage), which the test bounds too.
CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from flows.prior import train_task
    from bfr_models.diffusion.train import PriorTrainConfig
    from dataclasses import asdict

    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    folder, out, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cfg = PriorTrainConfig(resolution=128, channels=(8, 8, 8, 8, 8), steps=3, batch_size=2, checkpoint_every=3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    cap = vm_data() + headroom
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    uri = train_task.fn(key="k", input=folder, config=asdict(cfg), out=out, device="cpu", exclude=[],
                        loader_workers=1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"uri": uri, "rss_growth": after - before, "worker_rss": worker, "baseline": before}))
""")


def test_prior_train_streams_a_data_set_larger_than_its_memory_cap(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "faces"
    folder.mkdir()
    base = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(N_IMAGES):  # distinct images (a row differs), cheap to write
        image = base.copy()
        image[i % SIZE] = rng.integers(0, 256, (SIZE, 3), dtype=np.uint8)
        (folder / f"face_{i:04d}.png").write_bytes(encode_png(image))
    assert DATASET_BYTES > HEADROOM
    out = tmp_path / "prior"
    done = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(out), str(HEADROOM)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (out / "prior.json").exists() and (out / "checkpoints" / "train_state.safetensors").exists()
    assert report["rss_growth"] < HEADROOM, report
    assert 0 < report["worker_rss"] < report["baseline"] + HEADROOM, report  # the worker decoded a few images


def test_a_resumed_run_reads_the_batches_the_killed_run_would_have():
    from bfr_models.training.data import StepBatches

    straight = list(StepBatches(50, 4, seed=3, start=0, stop=10))
    assert list(StepBatches(50, 4, seed=3, start=6, stop=10)) == straight[6:]
    assert list(StepBatches(50, 4, seed=4, start=0, stop=10)) != straight  # the seed picks the order
    assert {i for batch in straight for i, _ in batch} <= set(range(50))


def _put_default_workers(queue) -> None:
    from bfr_models.training.data import default_workers

    queue.put(default_workers())


def test_a_daemonic_process_decodes_in_the_training_loop(monkeypatch):
    """A Dask worker process is daemonic and may not start DataLoader processes: training there decodes in
    the loop; elsewhere the cores beyond two (at most 8) decode."""
    from bfr_models.training.data import default_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)  # the forked child sees it too
    assert default_workers() == 8
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_put_default_workers, args=(queue,), daemon=True)
    child.start()
    try:
        assert queue.get(timeout=120) == 0
    finally:
        child.join(30)

