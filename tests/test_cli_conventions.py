"""Command-line conventions: -i/-o everywhere, lower-case long flags (the papers' letters kept as aliases),
defaults in every --help, methods and metrics listed from their registries, readable `presets`, and `score`
of images without a reference choosing no-reference metrics."""

from __future__ import annotations

import argparse
import json

import pytest

from bfr_models import manifest
from bfr_models.degradations import list_presets
from bfr_models.metrics.suite import KNOWN_METRICS
from bfr_models.pseudo_targets import METHODS
from flows.cli import HelpFormatter, build_parser
from tests.conftest import face_like, write_png
from tests.test_cli_errors import assert_one_line, run_cli


def parsers(parser=None, name="bfr-curate"):
    """(command name, parser) of the main parser and every subcommand's, however deep."""
    parser = parser or build_parser()
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from parsers(p, f"{name} {sub}")


def options(parser):
    return [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_command_has_short_flags_lower_case_names_and_shows_defaults():
    for name, parser in parsers():
        for action in options(parser):
            flags = action.option_strings
            if "--input" in flags or "--pairs" in flags:
                assert "-i" in flags, (name, flags)
            if "--out" in flags:
                assert "-o" in flags, (name, flags)
            longs = [f for f in flags if f.startswith("--")]
            assert any(f == f.lower() for f in longs), (name, flags)  # --N, --K, --L only as aliases
            text = HelpFormatter(name)._get_help_string(action)
            has_default = not (action.default is None or action.default is False or action.default == []
                               or action.required)
            if has_default:
                assert "default" in text, (name, flags, text)


def test_papers_letters_and_lower_case_names_set_the_same_parameters():
    parse = build_parser().parse_args
    common = ["pseudo-targets", "-i", "in", "--prior", "p", "-o", "out"]
    a = parse(common + ["-N", "8", "-K", "600", "-L", "300"])
    b = parse(common + ["--n-factor", "8", "--k-start", "600", "--l-end", "300"])
    c = parse(common + ["--N", "8", "--K", "600", "--L", "300"])
    assert (a.N, a.K, a.L) == (b.N, b.K, b.L) == (c.N, c.K, c.L) == (8, 600, 300)


def test_help_lists_every_method_metric_and_preset(capsys):
    helps = {name: p.format_help() for name, p in parsers()}
    assert all(m in helps["bfr-curate pseudo-targets"] for m in METHODS)
    assert all(m in helps["bfr-curate score"] for m in KNOWN_METRICS)
    assert all(p in helps["bfr-curate degrade"] for p in list_presets())
    assert "(default: dr2)" in helps["bfr-curate pseudo-targets"] and "(default: bf16 on CUDA, fp32 elsewhere)" in helps["bfr-curate clean"]


def test_presets_is_a_table_and_json_on_request(capfd):
    code, _, out = run_cli(capfd, "presets")
    assert code == 0 and "{" not in out
    header, rule, *rows = out.splitlines()
    assert header.split()[:3] == ["preset", "split", "scale"] and set(rule) <= {"-", " "}
    dr2 = next(r for r in rows if r.startswith("dr2 "))
    assert dr2.split()[1:5] == ["mild", "4/8/16", "3-5", "5-20"]  # DR2 mild: blur 3-5, noise 5-20
    assert {r.split()[0] for r in rows if not r.startswith(" ") and not r.startswith("(")} == set(list_presets())
    code, _, out = run_cli(capfd, "presets", "--json")
    described = json.loads(out)
    assert code == 0 and set(described) == set(list_presets())
    assert described["dr2"]["splits"]["mild"]["blur"]["sigma"] == [3, 5]


@pytest.fixture
def faces(tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for i in range(2):
        write_png(folder / f"f{i}.png", face_like(i, 192))  # NIQE needs two 96-px blocks
    return folder


def test_score_of_a_folder_without_reference_uses_no_reference_metrics(capfd, faces, tmp_path, monkeypatch):
    monkeypatch.setenv("BFR_CURATE_MODEL_CACHE", str(tmp_path / "empty-cache"))  # no MUSIQ weights
    code, lines, out = run_cli(capfd, "score", "-i", str(faces), "-o", str(tmp_path / "out"), "--device", "cpu")
    assert code == 0, lines
    assert (f"score: {faces} has no reference images (pass --reference for lpips,psnr,ssim): no-reference metrics "
            f"niqe; without musiq (`bfr-curate models pull musiq_koniq`)") in out
    uri = next((tmp_path / "out" / "score").glob("*/index.json")).parent
    df = manifest.read_manifest(str(uri))
    assert df["niqe"].notna().all() and "psnr" not in df
    # asking for a full-reference metric without a reference names the flags that fix it
    code, lines, _ = run_cli(capfd, "score", "-i", str(faces), "-o", str(tmp_path / "out"), "--metrics", "psnr")
    assert code == 2
    assert_one_line(lines, "needs a reference", "--reference", "--metrics niqe,musiq")
