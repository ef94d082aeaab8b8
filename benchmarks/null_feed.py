"""Null-model feed: the pseudo-targets and clean stages with their network replaced by one that does no work
(the prior predicts eps = 0, IDM predicts x0 = its condition), so images/s is what the pipeline costs around
the model: fetch, decode, the sampler's own arithmetic (noise, the low-pass constraint), best-of and the
quality gate's or acceptance rules' measures, PNG encode, writes, the manifest. On the CPU: the rate one GPU
can be fed at, whatever its network speed.

    python benchmarks/null_feed.py [--n 60] [--size 256] [--stages pseudo-targets,clean] [--batch-size 8]

The stages run as flows in this process (the same code as `bfr-curate pseudo-targets` / `clean`); a warm-up
run on two images first starts Prefect and fills the caches, so the figure is the steady rate. The networks
are swapped on the loaded models the shard tasks get from their load-once caches (``cached_prior``,
``cached_idm``): the saved models are real files with real hashes; only the benchmark swaps them.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class NullPrior(torch.nn.Module):
    """A UNet2DModel stand-in that predicts eps = 0."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # Prior.device reads the first parameter

    def forward(self, x, t):
        return SimpleNamespace(sample=torch.zeros_like(x))


class NullIDM(NullPrior):
    """An IDM UNet stand-in that predicts x0 = its condition (the input's last three channels)."""

    def forward(self, x, t):
        return SimpleNamespace(sample=x[:, 3:].clone())


def prepare(root: Path, n: int, size: int) -> tuple[Path, Path, str, str]:
    import cv2
    from diffusers import UNet2DModel

    from benchmarks.clean import SMALL
    from benchmarks.degrade import face_images
    from bfr_models.diffusion.prior import save_prior
    from bfr_models.idm import idm_unet, save_idm

    faces, warm = root / "faces", root / "warm"
    for folder in (faces, warm):
        folder.mkdir()
    for i, rgb in enumerate(face_images(n + 2, size)):
        cv2.imwrite(str((faces if i < n else warm) / f"face_{i:04d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    # a prior at the faces' resolution (so the stage does not resize): the smallest UNet2DModel there is
    unet = UNet2DModel(sample_size=size, block_out_channels=(8,), down_block_types=("DownBlock2D",),
                       up_block_types=("UpBlock2D",), layers_per_block=1, norm_num_groups=8)
    prior = save_prior(unet, str(root / "prior"), variance_type="fixed_large")
    idm = save_idm(idm_unet(SMALL), SMALL, str(root / "idm"))
    return faces, warm, prior, idm


def nullify(prior_uri: str, idm_uri: str) -> None:
    """Swap the networks of the models the shard tasks will get from their load-once caches."""
    from bfr_models import storage
    from tasks.clean import cached_idm
    from tasks.pseudo_targets import cached_prior

    cached_prior(prior_uri, "cpu").unet = NullPrior()
    cached_idm(storage.normalize(idm_uri), "cpu").unet = NullIDM()


def run_stage(stage: str, folder: Path, out: Path, prior: str, idm: str, batch_size: int) -> float:
    from flows.idm import clean_flow
    from flows.pseudo_targets import pseudo_targets_flow

    start = time.perf_counter()
    if stage == "pseudo-targets":
        pseudo_targets_flow(input=str(folder), out=str(out), prior=prior, device="cpu", batch_size=batch_size)
    else:
        clean_flow(input=str(folder), out=str(out), model=idm, device="cpu", batch_size=batch_size)
    return time.perf_counter() - start


def feed_only(folder: Path, out: Path, batch_size: int) -> float:
    """The shard pipeline with nothing between decode and encode: fetch, decode, one copy back, PNG encode,
    write, rows, the shard's Parquet file (what a GPU stage's host side does besides the sampler)."""
    from bfr_models.manifest import ManifestWriter
    from tasks.pipeline import ShardPipeline, host_batch, host_uint8
    from tasks.rows import ok_row
    from tasks.shards import list_inputs

    start = time.perf_counter()
    items, _ = list_inputs(str(folder))
    writer = ManifestWriter(str(out))
    with ShardPipeline("feed", items, batch_size, per_chunk=False) as shard:
        for batch in shard.batches():
            for d, rgb in zip(batch, host_uint8(host_batch(batch, torch.device("cpu")).float() / 255.0)):
                shard.write(d, writer, rgb, lambda out, d=d: ok_row("feed", d.item, d.parent_id, out, d.rgb))
        writer.write_shard("feed", shard.rows())
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=60, help="faces (default 60)")
    ap.add_argument("--size", type=int, default=256, help="face size in pixels (default 256)")
    ap.add_argument("--stages", default="pseudo-targets,clean")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")  # as the CLI: busy machines
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        faces, warm, prior, idm = prepare(root, args.n, args.size)
        nullify(prior, idm)
        feed_only(warm, root / "warm-out" / "feed", args.batch_size)
        rows.append(("shard I/O only: fetch, decode, encode, write, manifest (no sampler)",
                     feed_only(faces, root / "out" / "feed", args.batch_size)))
        for stage in args.stages.split(","):
            run_stage(stage, warm, root / "warm-out" / stage, prior, idm, args.batch_size)
            rows.append((stage, run_stage(stage, faces, root / "out" / stage, prior, idm, args.batch_size)))
    print(f"\nNull-model feed, {args.n} faces {args.size}x{args.size}, batch {args.batch_size}, CPU; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
          f"threads, torch {torch.__version__}; one run, after a 2-image warm-up\n")
    print("| stage (network replaced by a no-op) | seconds | img/s | goal |")
    print("|---|---:|---:|---:|")
    for stage, seconds in rows:
        print(f"| {stage} | {seconds:.1f} | {args.n / seconds:.1f} | 100 |")


if __name__ == "__main__":
    main()
