"""The report in a real browser (headless Debian Chromium): the per-image table renders, sorts, filters and
pages; every image loads; a thumbnail opens the full-size image written beside the report."""

import json

import numpy as np
import pandas as pd

from bfr_models.report import ScoredSet, build_report, write_report
from bfr_models.report.page import files_dir_for
from tests.conftest import face_like, write_png

ROWS = 250  # three pages of 100


def _report(tmp_path, monkeypatch) -> tuple:
    import bfr_models.report.page as page

    monkeypatch.setattr(page, "FULL_EMBED_BYTES", 0)  # full-size images as files beside the report
    uris = [str(write_png(tmp_path / "img" / f"f{i}.png", face_like(i, size=96))) for i in range(4)]
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "image_id": [f"id{i:04d}" for i in range(ROWS)],
        "uri": [uris[i % 4] for i in range(ROWS)],
        "parent_uri": [uris[(i + 1) % 4] for i in range(ROWS)],
        "parent_id": [f"p{i}" for i in range(ROWS)],
        "source_name": [f"face_{i:04d}" for i in range(ROWS)],
        "stage": "pseudo-targets", "split": ["mild" if i % 2 else "severe" for i in range(ROWS)], "status": "ok",
        "gate": ["fail" if i % 5 == 0 else "pass" for i in range(ROWS)],
        "gate_reason": ["noise: 12 > 8" if i % 5 == 0 else None for i in range(ROWS)],
        "niqe": rng.uniform(2, 9, ROWS).round(3),
        "lf_psnr": rng.uniform(20, 40, ROWS).round(3)})
    frame.loc[7, "niqe"] = np.nan  # missing values sort last
    out = tmp_path / "site" / "report.html"
    write_report(build_report([ScoredSet("targets", frame)], n_extremes=3, thumb_size=48,
                              files_dir=files_dir_for(str(out))), str(out))
    return out, frame


def _column(page, name: str) -> list[str]:
    heads = page.locator("#image-table thead th").all_inner_texts()
    j = next(i for i, h in enumerate(heads) if h.split()[0] == name)
    return page.locator(f"#image-table tbody tr td:nth-child({j + 1})").all_inner_texts()


def _state(page) -> dict:
    return json.loads(page.locator("#image-table").get_attribute("data-state"))


def test_report_table_sorts_filters_pages_and_images_load(tmp_path, monkeypatch, page):
    out, frame = _report(tmp_path, monkeypatch)
    page.goto(out.as_uri())
    page.wait_for_function("document.querySelector('#image-table').dataset.state")

    # first page rendered from the embedded rows
    assert page.locator("#image-table tbody tr").count() == 100
    assert _state(page) == {"sort": None, "dir": "asc", "page": 1, "pages": 3, "rows": ROWS}
    assert _column(page, "source_name")[:2] == ["face_0000", "face_0001"]

    # a click on a header sorts by it, a second click reverses; the missing value goes last both times
    page.locator("#image-table thead th", has_text="niqe").click()
    values = [float(v) for v in _column(page, "niqe")]
    assert values == sorted(values) and values[0] == float(f"{frame['niqe'].min():.4g}")
    page.locator("#image-table .last").click()
    assert _column(page, "niqe")[-1] == "—" and _state(page)["page"] == 3
    page.locator("#image-table thead th", has_text="niqe").click()
    assert _state(page)["sort"] == "niqe" and _state(page)["dir"] == "desc" and _state(page)["page"] == 1
    values = [float(v) for v in _column(page, "niqe")]
    assert values == sorted(values, reverse=True)

    # pagination
    page.locator("#image-table .next").click()
    assert _state(page)["page"] == 2 and page.locator("#image-table tbody tr").count() == 100
    assert "rows 101–200 of 250" in page.locator("#image-table .pageinfo").inner_text()

    # the gate select and the text filter narrow the rows
    page.locator("#image-table select[data-col]").nth(1).select_option(label="fail")
    assert _state(page)["rows"] == 50 and set(_column(page, "gate")) == {"fail"}
    page.locator("#image-table input.filter").fill("face_001")
    page.wait_for_function("JSON.parse(document.querySelector('#image-table').dataset.state).rows < 50")
    assert _column(page, "source_name") == ["face_0010", "face_0015"]  # fails are every 5th row
    # a condition on a metric, with text
    page.locator("#image-table select[data-col]").nth(1).select_option(label="all")
    page.locator("#image-table input.filter").fill("niqe<4 mild")
    expected = len(frame[(frame["niqe"] < 4) & (frame["split"] == "mild")])
    assert 0 < expected < 100
    page.wait_for_function(f"JSON.parse(document.querySelector('#image-table').dataset.state).rows === {expected}")
    assert all(float(v) < 4 for v in _column(page, "niqe")) and set(_column(page, "split")) == {"mild"}

    # every image loads; a thumbnail opens its full-size file from the folder beside the report
    assert page.evaluate("Array.from(document.images).length") > 0
    assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
    page.locator("img.zoom[data-full]").first.click()
    page.wait_for_function("(() => { const i = document.querySelector('#lightbox img');"
                           " return i && i.complete && i.naturalWidth > 0; })()")
    assert page.evaluate("document.querySelector('#lightbox img').naturalWidth") == 96
    assert page.evaluate("document.querySelector('#lightbox img').src").startswith(out.parent.as_uri() + "/report_files/")
    page.keyboard.press("Escape")
    assert page.locator("#lightbox").is_hidden()
    assert page.errors == []
