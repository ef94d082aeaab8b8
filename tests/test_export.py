"""Names users recognise and readable results: source_name down the lineage, exports, runs, score tables."""

import csv
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from bfr_models import manifest, storage
from bfr_models.manifest import ManifestWriter
from flows.cli import main
from flows.export import ExportError, export_manifest
from flows.readable import auto_grid
from tasks.shards import list_inputs
from tests.conftest import face_like, write_png


def _manifest_from(stdout: str, stage: str) -> str:
    """The manifest folder a command printed (``  manifest: <folder>/index.json``) after ``<stage>:``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{stage}:"))
    line = next(line for line in lines[start:] if line.strip().startswith("manifest:"))
    return line.split("manifest:", 1)[1].strip().rsplit("/", 1)[0]


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def test_source_names_from_folder_to_score_export_and_runs(tmp_path, capsys):
    folder = tmp_path / "faces"
    write_png(folder / "alice.png", face_like(0))
    write_png(folder / "team" / "bob smith.png", face_like(1))
    Image.fromarray(face_like(2)).save(folder / "carol.jpg", quality=95)
    write_png(folder / "carol.png", face_like(3))  # same stem as carol.jpg: a collision at export
    out = tmp_path / "run"

    assert main(["degrade", "--input", str(folder), "--out", str(out), "--preset", "gfpgan", "--device", "cpu",
                 "--workers", "1"]) == 0
    degraded = _manifest_from(capsys.readouterr().out, "degrade")
    df = manifest.read_manifest(degraded)
    assert sorted(df["source_name"]) == ["alice", "carol", "carol", "team/bob smith"]
    # a manifest's items carry it on: the next stage's rows (pseudo targets of these images) get the same names
    assert sorted(i.source_name for i in list_inputs(degraded)[0]) == sorted(df["source_name"])

    csv_path = tmp_path / "scores.csv"
    assert main(["score", "--input", degraded, "--metrics", "psnr,ssim", "--out", str(out), "--device", "cpu",
                 "--workers", "1", "--csv", str(csv_path)]) == 0
    printed = capsys.readouterr().out
    assert f"per-image scores: {csv_path} (4 rows)" in printed
    scored = _manifest_from(printed, "score")
    table = printed[printed.index("stage"):].splitlines()
    assert table[0].split() == ["stage", "split", "metric", "n", "mean", "median"]
    assert {tuple(line.split()[2:4]) for line in table[2:]} == {("psnr", "4"), ("ssim", "4")}
    with open(csv_path, newline="") as f:
        lines = list(csv.DictReader(f))
    assert sorted(r["source_name"] for r in lines) == ["alice", "carol", "carol", "team/bob smith"]
    assert all(float(r["psnr"]) > 0 for r in lines)

    assert main(["manifest", "show", scored, "--head", "2"]) == 0
    shown = capsys.readouterr().out
    lines = shown.splitlines()
    head = lines[next(i for i, line in enumerate(lines) if line.startswith("image_id ")):]
    assert head[0].split()[:4] == ["image_id", "source_name", "split", "status"] and "psnr" in head[0]
    first = manifest.read_manifest(scored).iloc[0]
    assert first["image_id"] in head[2] and first["source_name"] in head[2] and len(head) == 4

    assert main(["runs", str(out)]) == 0
    runs = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in runs[2:]] == ["degrade", "score"]
    # the score run's input is the degrade run under the same root
    assert str(folder) in runs[2] and "name=gfpgan" in runs[2]
    assert runs[3].split()[2] == "degrade/" + degraded.rsplit("/", 1)[1]

    # paired: the degraded image is LQ, its clean parent GT, under one name; the name collision is suffixed
    pairs = tmp_path / "basicsr"
    assert main(["export", "--input", scored, "--format", "basicsr", "--out", str(pairs)]) == 0
    assert "4 pairs" in capsys.readouterr().out
    names = ["alice.png", "carol.png", "carol__2.png", "team_bob_smith.png"]
    assert sorted(p.name for p in (pairs / "lq").iterdir()) == names
    assert sorted(p.name for p in (pairs / "gt").iterdir()) == names
    meta = (pairs / "meta_info.txt").read_text().splitlines()
    assert sorted(meta) == [f"{n} (64,64,3)" for n in names]
    by_name = {r["name"]: r for r in csv.DictReader(open(pairs / "names.csv", newline=""))}
    alice = df[df["source_name"] == "alice"].iloc[0]
    assert by_name["alice"]["image_id"] == alice["image_id"]
    assert (pairs / "lq" / "alice.png").read_bytes() == storage.read_bytes(alice["uri"])
    assert (pairs / "gt" / "alice.png").read_bytes() == (folder / "alice.png").read_bytes()
    # a JPEG parent is written as the PNG of the pixels the stages decoded
    carol_jpg = df[df["parent_uri"].str.endswith("carol.jpg")].iloc[0]
    name = next(n for n, r in by_name.items() if r["image_id"] == carol_jpg["image_id"])
    gt = np.asarray(Image.open(pairs / "gt" / f"{name}.png"))
    assert np.array_equal(gt, np.asarray(Image.open(folder / "carol.jpg").convert("RGB")))

    from basicsr.data.data_util import paired_paths_from_meta_info_file

    paths = paired_paths_from_meta_info_file([str(pairs / "lq"), str(pairs / "gt")], ["lq", "gt"],
                                             str(pairs / "meta_info.txt"), "{}")
    assert all(_png_size(p["lq_path"]) == _png_size(p["gt_path"]) for p in paths) and len(paths) == 4

    with pytest.raises(ExportError, match="not empty"):
        export_manifest(scored, "paired", str(pairs))


def _pseudo_target_manifest(root) -> str:
    """Pseudo-target rows by hand: LQ parents, targets, a gate verdict; two rows share a source name."""
    w = ManifestWriter(str(root / "pseudo-targets" / "k"))
    rows = []
    for i, (name, gate) in enumerate([("ann", "pass"), ("ann", "pass"), ("ben", "fail"), ("cy", "pass")]):
        lq = _png(face_like(i))
        target = _png(face_like(i + 10))
        lq_uri = w.write_image(f"lq{i}", lq)
        rows.append({"image_id": f"t{i}", "uri": w.write_image(f"t{i}", target), "sha256": storage.sha256_hex(target),
                     "width": 64, "height": 64, "parent_id": f"lq{i}", "parent_uri": lq_uri, "source_name": name,
                     "stage": "pseudo-targets", "split": "dr2", "status": "ok", "params": json.dumps({"N": 4}),
                     "lf_psnr": 30.0 + i, "gate": gate, "gate_reason": None if gate == "pass" else "noise"})
    rows.append({"image_id": "bad", "parent_uri": "/nowhere.png", "stage": "pseudo-targets", "status": "error",
                 "error": "pseudo-targets: sampler failed"})
    w.write_index("pseudo-targets", "k", {}, [w.write_shard("s", rows)])
    return w.stage_uri


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_export_pseudo_targets_gate_and_layouts(tmp_path, capsys):
    uri = _pseudo_target_manifest(tmp_path)
    assert main(["export", "--input", uri, "--format", "paired", "--out", str(tmp_path / "p")]) == 0
    assert "left out: 1 error, 1 gate rows" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "p" / "gt").iterdir()) == ["ann.png", "ann__2.png", "cy.png"]
    # pseudo targets: LQ = the parent (the input), GT = the target; ann (t0) sorts before ann__2 (t1)
    assert (tmp_path / "p" / "lq" / "ann.png").read_bytes() == _png(face_like(0))
    assert (tmp_path / "p" / "gt" / "ann__2.png").read_bytes() == _png(face_like(11))

    assert main(["export", "--input", uri, "--format", "folder", "--out", str(tmp_path / "f"),
                 "--include-failed"]) == 0
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["ann.png", "ann__2.png", "ben.png", "cy.png",
                                                                    "names.csv"]


def test_webdataset_export_to_s3_reads_back(tmp_path, s3_bucket):
    import s3fs
    import webdataset as wds

    uri = _pseudo_target_manifest(tmp_path)
    result = export_manifest(uri, "webdataset", f"{s3_bucket}/wds", samples_per_shard=2)
    assert result["written"] == 3
    fs = s3fs.S3FileSystem()
    shards = sorted(fs.ls(f"{s3_bucket}/wds"))
    assert [s.rsplit("/", 1)[1] for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    local = []
    for s in shards:
        local.append(tmp_path / s.rsplit("/", 1)[1])
        local[-1].write_bytes(fs.cat(s))
        with tarfile.open(local[-1]) as tar:
            assert all(m.name.count(".") in (1, 2) for m in tar.getmembers())
    samples = list(wds.WebDataset([str(p) for p in local], shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["ann", "ann__2", "cy"]
    assert all(set(s) >= {"lq.png", "gt.png", "json"} for s in samples)
    assert samples[2]["lq.png"] == _png(face_like(3)) and samples[2]["gt.png"] == _png(face_like(13))
    record = json.loads(samples[2]["json"])
    assert record["params"] == {"N": 4} and record["metrics"]["lf_psnr"] == 33.0 and record["gate"] == "pass"
    assert record["source_name"] == "cy" and record["image_id"] == "t3"


def test_paired_export_refuses_rows_without_a_pair(tmp_path):
    w = ManifestWriter(str(tmp_path / "ingest" / "k"))
    data = _png(face_like(0))
    w.write_index("ingest", "k", {}, [w.write_shard("s", [{
        "image_id": "a", "uri": w.write_image("a", data), "sha256": storage.sha256_hex(data), "parent_uri": "/p.jpg",
        "stage": "ingest", "status": "ok", "source_name": "a"}])])
    with pytest.raises(ExportError, match="needs rows with an LQ/GT pair.*ingest"):
        export_manifest(w.stage_uri, "basicsr", str(tmp_path / "out"))


def test_auto_grid_shows_candidates_and_choice():
    search = {"metric": "niqe", "chosen": 1, "reason": "best quality among 2 of 2 candidates",
              "grid": [{"method": "dr2", "N": 4, "tau": 100, "niqe": 7.1, "lf_psnr": 25.0, "noise_sigma": 7.1},
                       {"method": "dr2", "N": 4, "tau": 250, "niqe": 7.0, "lf_psnr": 24.0, "noise_sigma": 12.5}]}
    lines = auto_grid(search).splitlines()
    assert lines[1].split() == ["chosen", "tau", "niqe", "lf_psnr", "noise_sigma"]
    search["grid"] = [dict(sorted(g.items()), niqe=None) for g in search["grid"]]  # as read back from the index
    assert auto_grid(search).splitlines()[1].split() == ["chosen", "tau", "niqe", "lf_psnr", "noise_sigma"]
    assert lines[4].split()[:2] == ["*", "250"] and lines[3].split()[0] == "100"
    assert lines[-1] == "auto chose: tau=250 (best quality among 2 of 2 candidates)"


def test_pseudo_targets_auto_prints_grid_and_choice(tmp_path, capsys):
    faces = tmp_path / "faces"
    for i in range(2):
        write_png(faces / f"face_{i}.png", face_like(i, size=192))
    assert main(["prior", "train", "--input", str(faces), "--out", str(tmp_path / "prior"), "--device", "cpu",
                 "--resolution", "32", "--steps", "2", "--batch-size", "2", "--channels", "16,32"]) == 0
    (prior,) = [p.parent for p in (tmp_path / "prior").rglob("prior.json")]
    capsys.readouterr()
    assert main(["pseudo-targets", "--input", str(faces), "--out", str(tmp_path / "run"), "--prior", str(prior),
                 "--method", "dr2", "--respace", "10", "--auto", "--auto-grid", "N=4;tau=100,300", "--auto-sample", "2",
                 "--device", "cpu", "--workers", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(printed) if line.startswith("auto: 2 candidates scored with niqe"))
    header, marked = printed[start + 1].split(), [line for line in printed[start + 3:start + 5] if line.startswith("*")]
    assert header[:4] == ["chosen", "omega", "tau", "niqe"] and len(marked) == 1
    omega, tau = marked[0].split()[1:3]
    assert printed[start + 5].startswith(f"auto chose: omega={omega}, tau={tau} (")
