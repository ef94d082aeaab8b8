"""The HTML quality report: structure, ordering, numbers, robustness and escaping, on real small PNGs."""

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from bfr_models import manifest, storage
from bfr_models.manifest import ManifestWriter
from bfr_models.report import (METRIC_DIRECTIONS, ScoredSet, build_report, metric_columns, metric_direction,
                               nice_ticks, paired_deltas, render_report, summary_markdown, summary_table, write_report)
from bfr_models.report.table_view import Column, table_json

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.text = tag, dict(attrs), parent, [], []

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def find_all(self, tag=None, **attrs):
        return [n for n in self.walk() if (tag is None or n.tag == tag)
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def all_text(self):
        return "".join(self.text) + "".join(c.all_text() for c in self.children)


class TreeParser(HTMLParser):
    """Builds a tree and fails on any end tag that does not close the innermost open element."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", [])
        self.errors = []

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        self.cur.children.append(Node(tag, attrs, self.cur))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if self.cur.tag != tag:
            self.errors.append(f"</{tag}> closes <{self.cur.tag}>")
            return
        self.cur = self.cur.parent

    def handle_data(self, data):
        self.cur.text.append(data)


def parse(html: str) -> Node:
    p = TreeParser()
    p.feed(html)
    p.close()
    assert not p.errors, p.errors[:5]
    assert p.cur is p.root, f"unclosed <{p.cur.tag}>"
    return p.root


def _png(path, seed, size=64):
    rng = np.random.default_rng(seed)
    rgb = (rng.random((size, size, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    storage.write_bytes_atomic(str(path), buf.getvalue())
    return str(path)


# six ok rows; i0 and i5 are in the middle of both rankings, so with n=2 they are in no best/worst strip
NIQE = [3.0, 1.0, 5.0, 2.0, 6.0, 4.0]  # lower is better: best i1, i3; worst i4, i2
MUSIQ = [50.0, 70.0, 20.0, 60.0, 10.0, 40.0]  # higher is better: best i1, i3; worst i4, i2


def _scored(tmp_path, name="a", shift=0.0, missing=(), extra=None) -> ScoredSet:
    """A scored manifest written and read back through the real manifest code."""
    w = ManifestWriter(str(tmp_path / name))
    rows = []
    for i in range(6):
        uri = _png(tmp_path / name / "images" / f"i{i}.png", i)
        if i in missing:
            uri = str(tmp_path / name / "images" / "gone.png")
        parent = _png(tmp_path / name / "parents" / f"p{i}.png", 100 + i) if i in (0, 1, 2, 3) else None
        rows.append({"image_id": f"{name}{i}", "uri": uri, "width": 64, "height": 64, "parent_id": f"p{i}" if parent else None,
                     "parent_uri": parent, "stage": "degrade", "split": "dr2/mild" if i % 2 else "dr2/severe",
                     "status": "ok", "params": json.dumps({"sigma": i}), "niqe": NIQE[i] + shift,
                     "musiq": MUSIQ[i] - shift})
    rows.append({"image_id": f"{name}bad", "parent_uri": "/data/zero.png", "stage": "degrade", "split": "dr2/mild",
                 "status": "error", "error": "empty file (0 bytes)"})
    w.write_index("score", "k", {}, [w.write_shard("s", rows)])
    info = {"source": str(tmp_path / name),
            "conventions": {"niqe": "NIQE, pyiqa convention; lower is better",
                            "musiq": "MUSIQ-KonIQ; higher is better"},
            "set_metrics": {"fid": 12.3, "fid_convention": "clean", "fid_reference": "/ref/stats.npz", "fid_n": 6},
            "not_computed": [], **(extra or {})}
    return ScoredSet(name=f"set-{name}", frame=manifest.read_manifest(str(tmp_path / name)), info=info)


def _strip_ids(root: Node, kind: str, metric: str, set_index: int = 0) -> list[str]:
    (strip,) = root.find_all("div", id=f"{kind}-{metric}-{set_index}")
    return [f.attrs["data-image-id"] for f in strip.find_all("figure")]


def test_report_structure_thumbnails_and_order(tmp_path):
    s = _scored(tmp_path)
    html = render_report([s], n_extremes=2, thumb_size=48)
    root = parse(html)
    assert len(root.find_all("svg")) == 2  # one histogram per metric
    for svg in root.find_all("svg"):  # axes have tick labels
        assert len([t for t in svg.find_all("text") if t.attrs.get("class") == "tick"]) >= 4
    imgs = root.find_all("img")
    assert all(i.attrs["src"].startswith("data:image/png;base64,") for i in imgs)  # lossless
    # 2 metrics x (2 worst + 2 best) + 2 lineage strips x 2 images
    assert len(imgs) == 2 * 4 + 2 * 2
    thumb = Image.open(io.BytesIO(base64.b64decode(imgs[0].attrs["src"].split(",", 1)[1])))
    assert thumb.format == "PNG" and max(thumb.size) == 48
    # a click opens the full-size image: the file's own bytes, embedded
    (full_json,) = root.find_all("script", id="full-images")
    full = json.loads(full_json.all_text())
    first = imgs[0]
    original = storage.read_bytes(s.frame.set_index("image_id").loc[first.attrs["alt"], "uri"])
    assert base64.b64decode(full[first.attrs["data-full"]].split(",", 1)[1]) == original
    # lower-is-better and higher-is-better: best and worst first
    assert _strip_ids(root, "best", "niqe") == ["a1", "a3"]
    assert _strip_ids(root, "worst", "niqe") == ["a4", "a2"]
    assert _strip_ids(root, "best", "musiq") == ["a1", "a3"]
    assert _strip_ids(root, "worst", "musiq") == ["a4", "a2"]
    # the metric value is printed under each thumbnail
    (first,) = [f for f in root.find_all("div", id="worst-niqe-0")[0].find_all("figure")][:1]
    assert "niqe 6" in first.all_text()
    # lineage strips: parent beside the image, spread over both splits
    pairs = [n for n in root.find_all("div") if n.attrs.get("class") == "pair"]
    assert len(pairs) == 2
    splits = {s.frame.set_index("image_id").loc[p.attrs["data-image-id"], "split"] for p in pairs}
    assert splits == {"dr2/mild", "dr2/severe"}
    assert all(len(p.find_all("img")) == 2 for p in pairs)
    # a degraded image's parent from an input folder (no manifest) is its clean face
    assert all([i.all_text() for i in p.find_all("i")] == ["clean", "degraded"] for p in pairs)
    # errors, conventions, set-level metrics
    (errors,) = root.find_all("section", id="errors")
    assert "empty file (0 bytes)" in errors.all_text() and "/data/zero.png" in errors.all_text()
    (conv,) = root.find_all("section", id="conventions")
    assert "NIQE, pyiqa convention; lower is better" in conv.all_text()
    (setm,) = root.find_all("section", id="set-metrics")
    assert "12.3" in setm.all_text() and "clean" in setm.all_text()


def test_summary_table_matches_pandas(tmp_path):
    s = _scored(tmp_path)
    table = summary_table([s])
    assert list(table.columns[:7]) == ["set", "stage", "preset", "split", "n", "n_ok", "n_error"]
    assert {"niqe_mean", "niqe_median", "musiq_mean", "musiq_median"} <= set(table.columns)
    f = s.frame
    for rec in table.to_dict("records"):
        rows = f[(f["stage"] == rec["stage"]) & (f["split"] == rec["split"])]
        assert rec["set"] == "set-a" and rec["preset"] == "dr2"
        assert rec["n"] == len(rows) and rec["n_ok"] == (rows["status"] == "ok").sum()
        assert rec["n_error"] == (rows["status"] == "error").sum()
        for m in ("niqe", "musiq"):
            assert rec[f"{m}_mean"] == pytest.approx(rows[m].mean())
            assert rec[f"{m}_median"] == pytest.approx(rows[m].median())
    mild = table.set_index("split").loc["dr2/mild"]
    assert mild["n"] == 4 and mild["n_error"] == 1
    assert mild["niqe_mean"] == pytest.approx(np.mean([1.0, 2.0, 4.0]))  # i1, i3, i5
    md = summary_markdown([s])
    assert "| set-a | degrade | dr2 | dr2/mild | 4 | 3 | 1 |" in md
    assert "NIQE, pyiqa convention" in md and "fid = 12.3" in md


def test_unreadable_images_become_placeholders(tmp_path):
    s = _scored(tmp_path, missing=(4,))  # i4 is the worst of both metrics: its file is gone
    corrupt = tmp_path / "a" / "images" / "i2.png"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated: the second worst
    s.frame.loc[s.frame["image_id"] == "a1", "uri"] = None  # the best has no URI at all
    root = parse(render_report([s], n_extremes=2))
    for kind, metric in [("worst", "niqe"), ("best", "musiq")]:
        figs = root.find_all("div", id=f"{kind}-{metric}-0")[0].find_all("figure")
        assert all(not f.find_all("img") and f.find_all("div") for f in figs[:1])
    worst = root.find_all("div", id="worst-niqe-0")[0].find_all("figure")
    reasons = [d.attrs.get("title", "") for f in worst for d in f.find_all("div")]
    assert any("gone.png" in r for r in reasons) and any("truncated" in r or "corrupt" in r for r in reasons)
    best = root.find_all("div", id="best-niqe-0")[0].find_all("figure")
    assert best[0].find_all("div")[0].attrs["title"] == "no image URI" and best[1].find_all("img")


def test_text_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>"
    s = _scored(tmp_path, extra={"conventions": {"niqe": evil}, "source": evil,
                                 "not_computed": [{"metric": "musiq", "reason": evil, "needs": evil, "command": evil}]})
    s.name = f"set {evil}"
    f = s.frame
    f.loc[f["status"] == "error", "error"] = f"decode failed: {evil}"
    f.loc[f["image_id"] == "a4", "split"] = evil  # a worst image: its split is printed under the thumbnail
    html = render_report([s], title=evil, n_extremes=2, extra_sections=[(evil, "<p>trusted body</p>")])
    assert "<script>alert" not in html.lower()
    # the page's own scripts only: the rows' JSON (which holds the split and error as data), the full-size
    # images' JSON and the code
    assert html.lower().count("<script") == 3
    root = parse(html)
    (rows,) = root.find_all("script", **{"class": "rows"})
    split = next(c for c in json.loads(rows.all_text())["columns"] if c["name"] == "split")
    assert evil in split["values"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<p>trusted body</p>" in html
    root = parse(html)
    assert root.find_all("title")[0].all_text() == evil


def test_not_computed_names_file_and_command(tmp_path):
    missing = {"metric": "musiq", "reason": "weights missing", "needs": "musiq_koniq_ckpt-e95806b9.pth",
               "command": "bfr-curate models pull musiq_koniq"}
    s = _scored(tmp_path, extra={"not_computed": [missing]})
    s.frame = s.frame.drop(columns=["musiq"])
    root = parse(render_report([s]))
    (section,) = root.find_all("section", id="not-computed")
    text = section.all_text()
    assert "musiq" in text and "weights missing" in text
    assert "musiq_koniq_ckpt-e95806b9.pth" in text and "bfr-curate models pull musiq_koniq" in text
    assert len(root.find_all("svg")) == 1  # only niqe is plotted
    md = summary_markdown([s])
    assert "`musiq_koniq_ckpt-e95806b9.pth`" in md and "`bfr-curate models pull musiq_koniq`" in md
    # with nothing missing the section says so
    (ok,) = parse(render_report([_scored(tmp_path, name="b")])).find_all("section", id="not-computed")
    assert "Every requested metric was computed" in ok.all_text()


def test_compared_sets_share_histograms_with_a_legend(tmp_path):
    a = _scored(tmp_path, name="a")
    b = _scored(tmp_path, name="b", shift=1.5, extra={"conventions": {"niqe": "NIQE, matlab convention"}})
    html = render_report([a, b], n_extremes=2)
    root = parse(html)
    blocks = [n for n in root.find_all("div") if n.attrs.get("class") == "hist-block"]
    assert [b_.attrs["data-metric"] for b_ in blocks] == ["niqe", "musiq"]
    for block in blocks:
        assert len(block.find_all("svg")) == 1
        (legend,) = [n for n in block.find_all("div") if n.attrs.get("class") == "legend"]
        assert "set-a" in legend.all_text() and "set-b" in legend.all_text()
        colours = {p.attrs["stroke"] for p in block.find_all("path")}
        assert len(colours) == 2
    # each set gets its own best/worst strips; the compared set's order follows its own values
    assert _strip_ids(root, "best", "niqe", 1) == ["b1", "b3"]
    (conv,) = root.find_all("section", id="conventions")
    assert "differs" in conv.all_text()
    table = summary_table([a, b])
    assert table["set"].tolist() == ["set-a", "set-a", "set-b", "set-b"]
    assert summary_table([a, a])["set"].tolist() == ["set-a", "set-a", "set-a (2)", "set-a (2)"]  # told apart


def test_empty_sets_and_sets_without_metrics(tmp_path):
    empty = ScoredSet("empty", pd.DataFrame(columns=manifest.CORE_COLUMNS), {})
    plain = _scored(tmp_path)
    plain.frame = plain.frame.drop(columns=["niqe", "musiq"])
    plain.info = {}
    for sets in ([empty], [plain], [empty, plain], []):
        html = render_report(sets)
        root = parse(html)
        assert not root.find_all("svg")
        assert "No metric columns" in html
        summary_markdown(sets)
    table = summary_table([empty, plain])
    assert table.iloc[0]["set"] == "empty" and table.iloc[0]["n"] == 0
    assert table[table["set"] == plain.name]["n"].sum() == len(plain.frame)


def test_histogram_handles_constant_and_infinite_values(tmp_path):
    s = _scored(tmp_path)
    s.frame["psnr"] = [30.0, 30.0, np.inf, 30.0, 30.0, 30.0, np.nan]  # identical images give inf PSNR
    root = parse(render_report([s], n_extremes=2))
    (block,) = [n for n in root.find_all("div", data_metric="psnr") if n.attrs["class"] == "hist-block"]
    assert block.find_all("svg") and "1 not finite" in block.all_text()
    assert _strip_ids(root, "best", "psnr")[0] == "a2"
    assert summary_table([s])["psnr_mean"].tolist() == [30.0, np.inf]  # mild, severe (holds the inf)


def test_metric_columns_and_directions():
    f = pd.DataFrame({"image_id": ["x"], "niqe": [1.0], "psnr_y": [30.0], "psnr_label": ["a"], "ssim_ok": [True],
                      "sharpness": [2.0], "lpips": [0.1]})
    assert metric_columns(f) == ["niqe", "lpips", "psnr_y"]
    assert metric_direction("psnr_y") == "higher" and metric_direction("lpips") == "lower"
    assert metric_direction("sharpness") is None
    assert set(METRIC_DIRECTIONS) == {"niqe", "musiq", "lpips", "psnr", "ssim", "fid", "lf_psnr", "noise_sigma", "nrqm", "pi",
                                      "lowpass_psnr"}
    assert metric_direction("lf_psnr") == "higher" and metric_direction("noise_sigma") == "lower"
    ticks, _ = nice_ticks(0.11, 0.93, 5)
    assert ticks[0] >= 0.11 and ticks[-1] <= 0.93 and 3 <= len(ticks) <= 6


def test_write_report_is_atomic(tmp_path):
    out = str(tmp_path / "deep" / "report.html")
    assert write_report("<html>é</html>", out) == out
    assert (tmp_path / "deep" / "report.html").read_text(encoding="utf-8") == "<html>é</html>"
    assert not list((tmp_path / "deep").glob("*.tmp"))
    assert write_report("<p>x</p>", "memory://reports/r.html") == "memory://reports/r.html"
    assert storage.read_bytes("memory://reports/r.html") == b"<p>x</p>"


def test_best_and_worst_share_few_images_out(tmp_path):
    s = _scored(tmp_path)  # six ranked images, fewer than 2 x 8
    root = parse(render_report([s], n_extremes=8))
    for metric in ("niqe", "musiq"):
        best, worst = _strip_ids(root, "best", metric), _strip_ids(root, "worst", metric)
        assert best == ["a1", "a3", "a0"] and worst == ["a4", "a2", "a5"]  # halves, no image in both


def test_not_computed_is_listed_once_for_all_sets(tmp_path):
    missing = {"metric": "musiq", "reason": "weights missing", "needs": "musiq.pth", "command": "bfr-curate models pull musiq"}
    a, b = (_scored(tmp_path, name=n, extra={"not_computed": [missing]}) for n in ("a", "b"))
    root = parse(render_report([a, b], n_extremes=1))
    (section,) = root.find_all("section", id="not-computed")
    (table,) = section.find_all("table")
    rows = table.find_all("tr")[1:]
    assert len(rows) == 1 and rows[0].find_all("td")[1].all_text() == "all"
    assert "1 metric not computed" in root.find_all("div", **{"class": "banner"})[0].all_text()
    assert summary_markdown([a, b]).count("weights missing") == 1


def test_per_image_table_data(tmp_path):
    s = _scored(tmp_path)
    s.frame["gate"] = ["pass", "fail", "pass", None, "fail", "pass", None]
    s.frame["gate_reason"] = [None, "noise: 12 > 8", None, None, "fidelity: 9 dB < 27", None, None]
    s.frame.loc[0, "niqe"] = np.inf
    root = parse(render_report([s], n_extremes=1))
    (box,) = root.find_all("div", id="image-table")
    assert box.attrs["data-page-rows"] == "100"
    data = json.loads(box.find_all("script")[0].all_text())
    names = [c["name"] for c in data["columns"]]
    assert names == ["source_name", "image_id", "split", "status", "error", "gate", "gate_reason", "niqe", "musiq"]
    assert len(data["rows"]) == 7  # every row, errors too
    gate = data["columns"][names.index("gate")]
    assert gate["kind"] == "cat" and gate["values"] == ["fail", "pass"]
    by_id = {r[names.index("image_id")]: r for r in data["rows"]}
    assert by_id["a1"][names.index("gate")] == 0 and by_id["a1"][names.index("gate_reason")] == "noise: 12 > 8"
    assert by_id["a0"][names.index("niqe")] == "inf" and by_id["a2"][names.index("niqe")] == 5.0
    assert by_id["abad"][names.index("niqe")] is None
    heads = [th.all_text() for th in box.find_all("th")]
    assert heads[-2:] == ["niqe ↓", "musiq ↑"]
    assert [o.attrs.get("data-col") for o in box.find_all("select")] == ["2", "3", "5"]  # split, status, gate


def test_table_json_never_closes_its_script():
    frame = pd.DataFrame({"name": ["</script><b>x", "<!--"], "v": [1.0, -np.inf]})
    text = table_json(frame, [Column("name"), Column("v", "num")])
    assert "<" not in text
    assert json.loads(text)["rows"] == [["</script><b>x", 1.0], ["<!--", "-inf"]]


def test_paired_deltas_by_lineage(tmp_path):
    degraded = _scored(tmp_path, name="d")
    restored = _scored(tmp_path, name="r")  # each restored row's parent is a degraded row
    restored.frame["parent_id"] = degraded.frame["image_id"].to_numpy()
    restored.frame["niqe"] = degraded.frame["niqe"] + [-1.0, -1.0, 2.0, 0.0, -3.0, -1.0, np.nan]
    summary, per_image, rule = paired_deltas(degraded, restored)
    assert rule.startswith("lineage") and len(per_image) == 6  # the error rows are not paired
    niqe = summary.set_index("metric").loc["niqe"]
    assert niqe["pairs"] == 6 and niqe["improved"] == pytest.approx(4 / 6)  # lower NIQE is better
    assert niqe["worse"] == pytest.approx(1 / 6) and niqe["unchanged"] == pytest.approx(1 / 6)
    assert niqe["median_delta"] == pytest.approx(-1.0)
    assert per_image.set_index("image_id").loc["r4", "niqe_delta"] == pytest.approx(-3.0)
    # by name when there is no lineage: the same source_name
    for f, prefix in ((degraded.frame, "d"), (restored.frame, "r")):
        f["source_name"] = f["image_id"].str.replace(prefix, "face", regex=False)
    restored.frame["parent_id"] = None
    assert paired_deltas(degraded, restored)[2] == "the same source name and split"
    root = parse(render_report([degraded, restored], n_extremes=1))
    (section,) = root.find_all("section", id="paired")
    assert "67 %" in section.all_text() and section.find_all("div", id="paired-1")


def test_clean_rows_after_scores_cover_accepted_images(tmp_path):
    from bfr_models.report import Thumbnails
    from bfr_models.report_stages import clean_section

    s = _scored(tmp_path)
    f = s.frame[s.frame["status"] == "ok"].copy()
    f["stage"] = "clean"
    f["replaced"] = [True, False, True, False, True, False]
    f["niqe_before"] = [5.0] * 6
    f["niqe_after"] = [4.0, 9.0, 3.0, 9.0, 2.0, 9.0]  # the rejected candidates scored worse
    f["reasons"] = [None, "NIQE worse", None, "NIQE worse", None, "NIQE worse"]
    f["source_uri"], f["candidate_uri"] = f["parent_uri"], f["uri"]
    writer = ManifestWriter(str(tmp_path / "clean"))
    rows = [{k: (None if not isinstance(v, (str, bool)) and pd.isna(v) else v) for k, v in r.items()}
            for r in f.to_dict("records")]
    writer.write_index("clean", "k", {}, [writer.write_shard("s", rows)])
    f = manifest.read_manifest(str(tmp_path / "clean"))  # accepted rows' reasons come back as missing
    table = summary_table([ScoredSet("c", f)])
    after = table.set_index("split")["niqe_after_mean"]
    assert after["dr2/severe"] == pytest.approx(3.0)  # accepted only: i0, i2, i4
    assert np.isnan(after["dr2/mild"])  # no accepted candidate: the mild rows keep their originals
    assert "count only the accepted candidates" in render_report([ScoredSet("c", f)], n_extremes=1)
    html = clean_section("clean [k]", f, {"rounds": []}, Thumbnails(), n=3).html
    assert "nan" not in re.sub(r'"data:[^"]*"', "", html).lower()  # (base64 may spell it)
    assert "NIQE 5 -&gt; 4" in html and "over the 3 accepted candidates" in html


def test_full_size_images_beside_a_large_report(tmp_path, monkeypatch):
    import bfr_models.report.page as page

    s = _scored(tmp_path)
    monkeypatch.setattr(page, "FULL_EMBED_BYTES", 0)
    out = tmp_path / "out" / "my report.html"
    report = build_report([s], n_extremes=2, thumb_size=32, files_dir=page.files_dir_for(str(out)))
    assert write_report(report, str(out)) == str(out)
    files = sorted((tmp_path / "out" / "my report_files").iterdir())
    assert files and len(files) == len(report.files)
    root = parse(out.read_text())
    full = json.loads(root.find_all("script", id="full-images")[0].all_text())
    for img in root.find_all("img"):
        target = full[img.attrs["data-full"]]
        assert target.startswith("my%20report_files/")
        assert (out.parent / target.replace("%20", " ")).is_file()


def _stage(root, stage, rows, input=None, config=None) -> str:
    """A complete stage folder written by the real manifest code; ``input``: the stage it read."""
    w = ManifestWriter(str(root / stage))
    w.write_index(stage, stage[:4], config or {}, [w.write_shard("s", rows)], input=input)
    return str(root / stage)


def test_report_of_a_lineage_with_labels_and_paired_compare(tmp_path, capsys):
    """clean (ingest) -> degraded -> pseudo target, each stage reading the one before; the targets and the
    degraded images scored; the report's sets are named by label, show clean | degraded | target strips and
    pair each target with its degraded input."""
    from flows.cli import main
    from bfr_models.report.load import load_scored

    def row(stage, i, parent=None, **extra):
        iid = f"{stage[:3]}{i}"
        return {"image_id": iid, "uri": _png(tmp_path / stage / "images" / f"{iid}.png", i, size=40),
                "parent_id": parent and parent["image_id"], "parent_uri": parent and parent["uri"],
                "source_name": f"face{i}", "stage": stage, "split": "dr2", "status": "ok", **extra}

    clean = [row("ingest", i) for i in range(4)]
    degraded = [row("degrade", i, c) for i, c in enumerate(clean)]
    targets = [row("pseudo-targets", i, d, gate="pass" if i else "fail", gate_reason=None if i else "noise: 9 > 8")
               for i, d in enumerate(degraded)]
    ingest = _stage(tmp_path, "ingest", clean)
    degrade = _stage(tmp_path, "degrade", degraded, input=ingest)
    pt = _stage(tmp_path, "pseudo-targets", targets, input=degrade)
    scored_t = _stage(tmp_path / "st", "score", [{**r, "niqe": 4.0 + i} for i, r in enumerate(targets)], input=pt,
                      config={"source": pt})
    scored_d = _stage(tmp_path / "sd", "score", [{**r, "niqe": 6.0 + (i % 2) * -2.0} for i, r in enumerate(degraded)],
                      input=degrade, config={"source": degrade})
    sets = [load_scored(scored_t, "targets"), load_scored(scored_d, "degraded")]
    assert sorted(sets[0].lineage.index) == sorted([r["image_id"] for r in clean + degraded + targets])
    root = parse(render_report(sets))
    (section,) = root.find_all("section", id="sets")
    assert [tr.find_all("td")[0].all_text() for tr in section.find_all("tr")[1:]] == ["targets", "degraded"]
    # the targets' strips: clean | degraded | target, read from the manifests up the chain of inputs
    (lineage,) = root.find_all("section", id="lineage")
    strips = [d for d in lineage.find_all("div") if d.attrs.get("class") == "pair"]
    first = [s for s in strips if s.attrs["data-image-id"] == "pse0"][0]
    assert [f.find_all("i")[0].all_text() for f in first.find_all("figure")] == ["clean", "degraded", "target"]
    assert [i.attrs["alt"] for i in first.find_all("img")] == ["ing0", "deg0", "pse0"]
    assert "gate fail: noise: 9 > 8" in first.all_text() and "face0" in first.all_text()
    # paired: every target with its degraded input; degraded - target NIQE = 2, -1, 0, -3 (lower is better)
    (paired,) = root.find_all("section", id="paired")
    assert "4 pairs by lineage: the first set's image's parent is the compared image" in paired.all_text()
    (table,) = [t for t in paired.find_all("table") if t.attrs.get("class") == "paired"]
    cells = [td.all_text() for td in table.find_all("tr")[1].find_all("td")]
    assert cells[0] == "niqe ↓" and cells[1] == "4" and cells[6:] == ["50 %", "25 %", "25 %"]
    # a --label must name one of the report's manifests (refused before any work)
    assert main(["report", "--input", scored_t, "--label", f"x={scored_d}", "--out", str(tmp_path / "o.html")]) == 2
    assert "is not --input or one of --compare" in capsys.readouterr().err
    assert main(["report", "--input", scored_t, "--label", "nameless", "--out", str(tmp_path / "o.html")]) == 2
    assert "expected NAME=MANIFEST" in capsys.readouterr().err
    assert not (tmp_path / "o.html").exists()
