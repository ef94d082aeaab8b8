"""The pseudo-targets stage end to end: prior train/inspect, --auto, one-line errors, and a recipe."""

import json
import os
import socket
import subprocess
from dataclasses import asdict

import pytest

from bfr_models import manifest, storage
from bfr_models.gate import GateConfig
from bfr_models.imageio import decode_rgb
from flows.cli import main
from flows.pseudo_targets import pseudo_targets_flow
from flows.recipe import RecipeError, load_recipe, recipe_flow
from tests.conftest import BIN, REPO, face_like, install_models, task_states, write_png

TINY_PRIOR = ["--resolution", "32", "--steps", "4", "--batch-size", "2", "--channels", "16,32", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def faces_192(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faces")
    for i in range(4):
        write_png(folder / f"face_{i}.png", face_like(i, size=192))
    return folder


@pytest.fixture(scope="module")
def prior_uri(faces_192, tmp_path_factory):
    out = tmp_path_factory.mktemp("prior_out")
    assert main(["prior", "train", "--input", str(faces_192), "--out", str(out), "--device", "cpu", *TINY_PRIOR]) == 0
    (found,) = [p.parent for p in out.rglob("prior.json")]
    assert (found / "checkpoints" / "train_state.safetensors").exists()
    return str(found)


def test_prior_train_on_dask_local_runs_on_a_worker_and_records_where(faces_192, prior_uri, tmp_path):
    """`prior train --dask local`: the training is one task on a LocalCluster worker process, its progress on
    the command's bar; each prior records where it was trained (the fixture's: this process)."""
    source = json.loads(storage.read_bytes(storage.join(prior_uri, "prior.json")))["source"]
    assert source["worker"] == f"{socket.gethostname()}:{os.getpid()}" and source["device"] == "cpu"
    proc = subprocess.Popen([str(BIN / "bfr-curate"), "prior", "train", "--input", str(faces_192), "--out",
                             str(tmp_path / "o"), "--device", "cpu", "--dask", "local", *TINY_PRIOR],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    (found,) = [p.parent for p in (tmp_path / "o").rglob("prior.json")]
    source = json.loads((found / "prior.json").read_text())["source"]
    host, pid = source["worker"].rsplit(":", 1)
    assert host == socket.gethostname() and int(pid) not in (proc.pid, os.getpid()) and source["step"] == 4
    assert "prior train:" in err and "/4 [" in err and "INFO" not in err  # the bar, no scheduler chatter


def test_prior_inspect_prints_what_it_is(prior_uri, capsys):
    assert main(["prior", "inspect", prior_uri]) == 0
    text = capsys.readouterr().out
    assert "resolution: 32" in text and "linear betas 0.0001..0.02, T=1000, epsilon" in text
    assert "variance:   fixed_large" in text
    meta = json.loads((storage.read_bytes(storage.join(prior_uri, "prior.json"))))
    assert f"sha256:     {meta['weights_sha256']}" in text


def test_pseudo_targets_auto_records_grid_and_choice(faces_192, prior_uri, tmp_path):
    kwargs = dict(input=str(faces_192), out=str(tmp_path / "run"), prior=prior_uri, method="dr2", respace=20,
                  auto=True, auto_grid="N=4,8;tau=100,300", auto_sample=2, shard_size=2, batch_size=4, device="cpu")
    state = pseudo_targets_flow(**kwargs, return_state=True)
    uri = state.result()
    auto = manifest.read_index(uri)["config"]["auto"]
    assert len(auto["grid"]) == 4 and {"niqe", "lf_psnr", "N", "tau"} <= set(auto["grid"][0])
    chosen = auto["grid"][auto["chosen"]]
    df = manifest.read_manifest(uri)
    assert len(df) == 4 and (df["status"] == "ok").all()
    assert (df["dtype"] == "fp32").all() and manifest.read_index(uri)["config"]["dtype"] == "fp32"  # CPU: fp32
    for row in df.itertuples():
        params = json.loads(row.params)
        assert (params["N"], params["tau"]) == (chosen["N"], chosen["tau"])
        assert params["auto"]["chosen"]["tau"] == chosen["tau"] and params["seed"] == row.seed
        assert params["resize"] == {"from": [192, 192], "prior": 32, "out": [192, 192]}
        assert row.lf_psnr > 0 and row.noise_sigma >= 0
        assert decode_rgb(storage.read_bytes(row.uri))[0].shape == (192, 192, 3)
    # the quality gate: a verdict and every measure per row, thresholds and the checks not made in the index
    gate = manifest.read_index(uri)["config"]["gate"]
    assert gate["thresholds"] == asdict(GateConfig()) and isinstance(gate["not_checked"], list)
    assert {"gate", "gate_reason", "lowres_psnr", "chroma_shift", "input_noise_sigma", "target_niqe"} <= set(df.columns)
    assert set(df["gate"]) <= {"pass", "fail"} and (df["gate_reason"].notna() == (df["gate"] == "fail")).all()
    assert 0 <= auto["grid"][0]["gate_pass_rate"] <= 1 and auto["min_pass_rate"] == GateConfig().auto_min_pass_rate
    again = pseudo_targets_flow(**kwargs, return_state=True)
    assert again.result() == uri and set(task_states(again)) == {"Cached"}  # the search and every shard


@pytest.mark.parametrize("args, message", [
    (["--N", "3"], "N=3 does not divide the prior's resolution 32"),
    (["--tau", "400", "--omega", "300"], "tau (400) must be smaller than omega (300)"),
    (["--method", "lowfreq", "--K", "300", "--L", "360"], "L (360) must be smaller than K (300)"),
    (["--resize", "refuse"], None),
    (["--dtype", "bf16"], "--dtype bf16 needs a CUDA device (this run uses cpu"),
    (["--compile"], "--compile needs a CUDA device"),
])
def test_bad_parameters_stop_before_work(faces_192, prior_uri, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    code = main(["pseudo-targets", "--input", str(faces_192), "--prior", prior_uri, "--out", str(out),
                 "--device", "cpu", *args])
    err = capsys.readouterr().err.strip()
    if message is None:  # a folder's sizes are only known per image: rows say why, the run completes
        assert code == 0
        (uri,) = [p.parent for p in out.rglob("index.json")]
        df = manifest.read_manifest(str(uri))
        assert (df["status"] == "error").all() and df["error"].str.contains("differs from the prior's resolution 32").all()
        assert (df["dtype"] == "fp32").all()  # every row says which precision made it, error rows too
        return
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_missing_and_tampered_priors_are_one_line_errors(faces_192, prior_uri, tmp_path, capsys):
    args = ["pseudo-targets", "--input", str(faces_192), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert main([*args, "--prior", str(tmp_path / "nowhere")]) == 2
    assert "neither a prior folder nor a model card" in capsys.readouterr().err
    import shutil

    bad = tmp_path / "tampered"
    shutil.copytree(prior_uri, bad)
    weights = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    assert main([*args, "--prior", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "but prior.json says" in err and len(err.splitlines()) == 1
    assert main([*args, "--prior", prior_uri, "--method", "dr2", "--restorer", "none"]) == 2
    assert "--restorer applies to lowfreq and polish" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


RECIPE = """
name: tiny
photos: {photos}
degrade: {{preset: dr2, split: mild, scale: 4}}
prior: {{train: {{resolution: 32, steps: 4, batch_size: 2, channels: [16, 32], checkpoint_every: 2}}}}
pseudo_targets: {{method: dr2, respace: 20, shard_size: 2, auto: true, auto_grid: "N=4;tau={tau},300", auto_sample: 2}}
score: {{metrics: "niqe,psnr,ssim"}}
report: {{title: tiny recipe}}
"""


def test_recipe_runs_end_to_end_and_an_edit_reruns_only_what_follows(faces_192, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE.format(photos=faces_192, tau=100))
    out = str(tmp_path / "run")
    first = recipe_flow(recipe=load_recipe(str(path)), out=out, device="cpu")
    html = (tmp_path / "run" / "report.html").read_text()
    assert first["report"].endswith("report.html") and "tiny recipe" in html
    assert "Pseudo-target parameter search (--auto)" in html and "lf_psnr" in html
    assert "Quality gate: pseudo-targets" in html and "targets passed the gate" in html
    scored = manifest.read_manifest(first["score pseudo-targets"])
    # the targets are scored against the faces two generations up (target -> degraded -> face)
    assert len(scored) == 4 and scored["psnr"].notna().all() and scored["niqe"].notna().all()

    def mtimes(stage_uri):
        return {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.parquet") if str(p).startswith(stage_uri)}

    kept = {**mtimes(first["degrade"]), **mtimes(first["score degrade"])}
    path.write_text(RECIPE.format(photos=faces_192, tau=150))
    second = recipe_flow(recipe=load_recipe(str(path)), out=out, device="cpu")
    assert second["degrade"] == first["degrade"] and second["prior"] == first["prior"]
    assert second["pseudo-targets"] != first["pseudo-targets"]
    assert second["score pseudo-targets"] != first["score pseudo-targets"]
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # upstream shards were not rewritten


@pytest.mark.parametrize("text, message", [
    ("photos: x\ndegrade: {preset: dr2, sigma: 3}\n", "degrade.sigma is not an option"),
    ("photos: x\nfoo: 1\n", "unknown key 'foo'"),
    ("degrade: {preset: dr2}\n", "'photos'"),
    ("photos: x\npseudo_targets: {method: dr2}\n", "pseudo_targets needs a prior"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_recipe(str(path))


def test_lowfreq_with_a_restorer_checkpoint_records_it(faces_192, prior_uri, tmp_path):
    from bfr_models.restorers import SmallRestorer, save_restorer

    ckpt = save_restorer(SmallRestorer(channels=8, blocks=1), str(tmp_path / "small.safetensors"))
    uri = pseudo_targets_flow(input=str(faces_192), out=str(tmp_path / "run"), prior=prior_uri, method="lowfreq",
                              N=8, respace=10, restorer=ckpt, best_of=2, device="cpu")
    df = manifest.read_manifest(uri)
    assert (df["status"] == "ok").all()
    params = json.loads(df["params"].iloc[0])
    assert (params["K"], params["L"], params["N"]) == (600, 360, 8) and params["best_of"] == 2
    assert params["restorer"]["arch"] == "small" and params["restorer"]["sha256"] == storage.sha256_hex(
        storage.read_bytes(ckpt))


def test_difbfsr_super_resolves_lr_faces_and_refuses_wrong_sizes(prior_uri, tmp_path, capsys):
    lr = tmp_path / "lr"
    for i in range(3):
        write_png(lr / f"face_{i}.png", face_like(i, size=8))  # the tiny prior is 32 px: 8 px LR at x4
    uri = pseudo_targets_flow(input=str(lr), out=str(tmp_path / "run"), prior=prior_uri, method="difbfsr",
                              respace=20, warmup=5, batch_size=2, device="cpu")
    df = manifest.read_manifest(uri)
    assert (df["status"] == "ok").all() and len(df) == 3
    params = json.loads(df["params"].iloc[0])
    assert (params["scale"], params["t_start"], params["warmup"], params["N"]) == (4, 401, 5, 1)  # N: a 64-px band
    assert params["difbfsr"]["lr_srm"] == 2e-3 and params["difbfsr"]["lr_cfm"] == 5e-3
    assert decode_rgb(storage.read_bytes(df["uri"].iloc[0]))[0].shape == (32, 32, 3)
    big = tmp_path / "lr16"
    write_png(big / "face.png", face_like(0, size=16))
    uri = pseudo_targets_flow(input=str(big), out=str(tmp_path / "run2"), prior=prior_uri, method="difbfsr",
                              respace=20, warmup=5, resize="refuse", device="cpu")
    (err,) = manifest.read_manifest(uri)["error"]
    assert "16x16 times scale 4 differs from the prior's resolution 32" in err
    args = ["pseudo-targets", "--input", str(lr), "--prior", prior_uri, "--method", "difbfsr", "--device", "cpu",
            "--out", str(tmp_path / "o")]
    assert main([*args, "--scale", "3"]) == 2
    assert "scale 3 has no SR module config" in capsys.readouterr().err
    assert main([*args, "--restorer", "none"]) == 2
    assert "difbfsr works on the LQ input itself" in capsys.readouterr().err


def test_shipped_recipes_are_valid():
    demo = load_recipe("demo")
    assert demo["pseudo_targets"]["auto"] and "train" in demo["prior"]
    sr = load_recipe("difbfsr_celeba_x4")
    assert sr["pseudo_targets"]["method"] == "difbfsr" and sr["degrade"]["preset"] == "difbfsr-gaussian8"
    assert sr["score_degraded"] is False and sr["prior"] == {"uri": "ffhq512_iddpm_difface"}


def test_difbfsr_recipe_end_to_end_gives_the_table_1_report(tmp_path):
    hq = tmp_path / "hq"
    for i in range(4):
        write_png(hq / f"face_{i}.png", face_like(i, size=32))
    path = tmp_path / "sr.yaml"
    path.write_text(f"""
name: sr
photos: {hq}
score_degraded: false
degrade: {{preset: difbfsr-gaussian8}}
prior: {{train: {{resolution: 32, steps: 4, batch_size: 2, channels: [16, 32], checkpoint_every: 4}}}}
pseudo_targets: {{method: difbfsr, respace: 20, warmup: 5, resize: refuse}}
score: {{metrics: "psnr,ssim"}}
report: {{title: sr protocol}}
""")
    results = recipe_flow(recipe=load_recipe(str(path)), out=str(tmp_path / "run"), device="cpu")
    assert "score degrade" not in results
    scored = manifest.read_manifest(results["score pseudo-targets"])
    assert len(scored) == 4 and (scored["status"] == "ok").all() and scored["psnr"].notna().all()
    assert scored["split"].str.match(r"difbfsr-gaussian8/case[1-8]$").all()
    html = (tmp_path / "run" / "report.html").read_text()
    assert "DifBFSR protocol (Table 1 layout)" in html and "25.27" in html


def test_the_gate_scorers_pseudo_targets_warms_are_the_ones_its_shards_use(faces_192, prior_uri, tmp_path,
                                                                          monkeypatch, musiq_bytes):
    """What the console command loads while Prefect starts (flows/warm.py) is what the shards' quality gate then
    finds in its cache (here MUSIQ, from a model card with random weights; no FaceNet weights)."""
    from flows.pseudo_targets import plan_gate
    from tasks.clean import cached_scorer
    from tasks.pseudo_targets import warm

    install_models(monkeypatch, tmp_path, {"musiq_koniq": musiq_bytes})
    scorers = plan_gate(None, str(faces_192), 32, "input", 1)[2]
    assert scorers == {"gate_musiq": True, "gate_identity": False}
    cached_scorer.cache_clear()
    warm(scorers["gate_musiq"], scorers["gate_identity"], "cpu")
    assert cached_scorer.cache_info().misses == 1
    assert main(["pseudo-targets", "--input", str(faces_192), "--prior", prior_uri, "--out", str(tmp_path / "run"),
                 "--respace", "5", "--device", "cpu"]) == 0
    assert cached_scorer.cache_info().misses == 1 and cached_scorer.cache_info().hits >= 1
    rows = manifest.read_manifest(str(next((tmp_path / "run" / "pseudo-targets").glob("*/index.json")).parent))
    assert rows["target_musiq"].notna().all()  # the gate scored with it
