"""Ingest end to end on the packaged demo photos, run on a real Dask LocalCluster."""

import json

import numpy as np
from prefect_dask import DaskTaskRunner

from bfr_models import manifest, storage
from bfr_models.imageio import decode_rgb
from flows.runners import local_cluster_kwargs
from flows.demo import write_demo_photos
from flows.ingest import ingest_flow
from flows.threads import intra_op_threads
from tests.conftest import write_png


def test_ingest_demo_photos_on_dask(tmp_path):
    photos = write_demo_photos(str(tmp_path / "out"))
    write_png(tmp_path / "out" / "photos" / "blank.png", np.full((128, 128, 3), 200, np.uint8))
    runner = DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(2))
    uri = ingest_flow.with_options(task_runner=runner)(input=photos, out=str(tmp_path / "out"), device="cpu",
                                                       shard_size=1)
    assert manifest.read_index(uri)["config"]["threads"] == intra_op_threads(2)  # the workers' torch threads
    df = manifest.read_manifest(uri)
    ok = df[df["status"] == "ok"]
    per_photo = ok["parent_uri"].map(lambda u: u.rsplit("/", 1)[-1]).value_counts().to_dict()
    assert per_photo == {"t1.png": 6, "astronaut.png": 1, "Tom_Hanks_54745.png": 1}
    blank = df[df["parent_uri"].str.endswith("blank.png")]
    assert len(blank) == 1 and blank.iloc[0]["status"] == "error" and "no face" in blank.iloc[0]["error"]
    for row in ok.itertuples():
        rgb, _ = decode_rgb(storage.read_bytes(row.uri))
        assert rgb.shape == (512, 512, 3)
        params = json.loads(row.params)
        assert len(params["landmarks"]) == 5 and params["score"] >= 0.9
