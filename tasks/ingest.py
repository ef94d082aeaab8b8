"""The ingest shard task: photos in, aligned 512x512 face crops out (one row per face)."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task

from bfr_models.faces import FaceAligner
from bfr_models.imageio import encode_png
from bfr_models.manifest import ManifestWriter
from tasks.rows import decode_items, error_row, ok_row, stamp, write_output
from tasks.runtime import load_once, resolve_device, shard_cache_key
from tasks.shards import ShardSpec, read_many

STAGE = "ingest"


@load_once(maxsize=4)
def _aligner(size: int, min_score: float, min_size: int, device: str) -> FaceAligner:
    return FaceAligner(size=size, min_score=min_score, min_size=min_size, device=device)


@task(name="ingest-shard", cache_key_fn=shard_cache_key, persist_result=True, cache_result_in_memory=False)
def ingest_shard(spec: ShardSpec, stage_uri: str, size: int, min_score: float, min_size: int, device: str,
                 batch_size: int) -> dict:
    dev = resolve_device(device)
    aligner = _aligner(size, min_score, min_size, str(dev))
    writer = ManifestWriter(stage_uri)
    decoded, rows = decode_items(STAGE, spec.items, read_many([i.uri for i in spec.items]))
    for start in range(0, len(decoded), batch_size):
        batch = decoded[start : start + batch_size]
        faces_per_photo = aligner.align([rgb for _, _, rgb, _ in batch])
        for (item, parent_id, rgb, source), faces in zip(batch, faces_per_photo):
            if not faces:
                rows.append(error_row(STAGE, item, f"no face found (min_score={min_score}, min_size={min_size})"))
                continue
            for face in faces:
                written = write_output(writer, encode_png(face.image), parent_id)
                params = {
                    "box": [round(float(v), 2) for v in face.box],
                    "landmarks": [[round(float(v), 2) for v in p] for p in face.landmarks],
                    "score": round(float(face.score), 5),
                    "face_index": face.face_index,
                    "source_size": [int(rgb.shape[1]), int(rgb.shape[0])],
                    **source,
                    "size": size,
                }
                rows.append(ok_row(STAGE, item, parent_id, written, face.image, params=params, split="faces"))
    return asdict(writer.write_shard(spec.key, stamp(rows, dev)))
