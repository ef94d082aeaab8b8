"""The page: CSS and scripts, the assembled document, the full-size images and writing it all."""

from __future__ import annotations

import base64
import json
import posixpath
from dataclasses import dataclass, field
from urllib.parse import quote

from bfr_models import storage
from bfr_models.report.base import ScoredSet, Section, _note, _slug, esc, prepared
from bfr_models.report.charts import histogram_section
from bfr_models.report.compare import compare_section
from bfr_models.report.images import Thumbnails, extremes_section, lineage_section
from bfr_models.report.table_view import TABLE_JS, image_table_section
from bfr_models.report.tables import (conventions_section, errors_section, not_computed, not_computed_section,
                                      protocol_section, set_metrics_section, sets_section, summary_section)

# full-size images are embedded while they total at most this, else written beside the report
FULL_EMBED_BYTES = 8 * 2**20
MAX_STRIP = 32  # images per best/worst or lineage strip, whatever --n asks: grids stay bounded at any size

# --------------------------------------------------------------------------------------------
# the page

CSS = """
:root{--fg:#1f2937;--muted:#6b7280;--line:#e5e7eb;--head:#f3f4f6;--accent:#0072B2}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);
 margin:0;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:18px 24px 60px;background:#fff}
h1{font-size:24px;margin:6px 0 10px}
h2{font-size:19px;margin:34px 0 10px;padding-bottom:4px;border-bottom:2px solid var(--line)}
h3{font-size:15px;margin:18px 0 6px}
nav{font-size:13px;margin:4px 0 10px}
nav a{margin-right:12px;color:var(--accent);text-decoration:none;white-space:nowrap}
nav a:hover{text-decoration:underline}
table{border-collapse:collapse;margin:6px 0 10px;font-size:13px}
th,td{border:1px solid var(--line);padding:3px 8px;text-align:left;vertical-align:top}
th{background:var(--head);font-weight:600}
th.mh{text-align:center}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fbfbfc}
.summary{font-size:12.5px}
.summary td,.summary th{white-space:nowrap;padding:3px 6px}
.summary td:first-child{white-space:normal;min-width:90px}
.scroll{overflow-x:auto}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f3f4f6;padding:1px 4px;
 border-radius:3px;word-break:break-all}
.note{color:var(--muted);font-size:12.5px;margin:4px 0}
.warn{color:#b45309;font-weight:600}
.banner{background:#fff7ed;border:1px solid #fdba74;border-radius:6px;padding:8px 12px;margin:10px 0}
.sw{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:5px;vertical-align:-1px}
.dir{color:var(--muted);font-weight:400;font-size:13px}
.hists{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:6px 18px}
.hist-block h3{margin-bottom:2px}
svg.hist{display:block;font-family:inherit}
svg.hist .tick{font-size:11px;fill:#4b5563}
svg.hist .axis{font-size:12px;fill:#111827}
.legend{font-size:12.5px;margin:0 0 6px 52px}
.legend .li{margin-right:14px;display:inline-block}
.legend small{color:var(--muted)}
.strip{margin:6px 0 10px}
.strip-head{font-size:13px;margin-bottom:3px}
.kind{font-weight:600;text-transform:uppercase;font-size:11.5px;letter-spacing:.04em;padding:1px 6px;border-radius:3px}
.kind.worst{background:#fee2e2;color:#991b1b}
.kind.best{background:#dcfce7;color:#166534}
.thumbs,.pairs{display:flex;flex-wrap:wrap;gap:8px}
figure.thumb{margin:0;display:flex;flex-direction:column;align-items:center}
figure.thumb img{display:block;border:1px solid var(--line);background:#eee}
figure.thumb img.up{image-rendering:pixelated}
figcaption{font-size:11px;line-height:1.3;text-align:center;margin-top:2px;overflow-wrap:anywhere}
figcaption .id{font-family:ui-monospace,Menlo,Consolas,monospace;color:var(--muted)}
figcaption .split,figcaption .vals{color:var(--muted)}
.pair{display:flex;gap:3px;padding:4px;border:1px solid var(--line);border-radius:6px;background:#fcfcfd}
.ph{display:flex;flex-direction:column;align-items:center;justify-content:center;text-align:center;
 background:repeating-linear-gradient(45deg,#f3f4f6,#f3f4f6 6px,#e5e7eb 6px,#e5e7eb 12px);
 border:1px dashed #9ca3af;color:#6b7280;font-size:11px;padding:4px;overflow:hidden}
.ph small{font-size:9.5px;overflow-wrap:anywhere}
table.errors td:last-child,table.nc td{max-width:520px;overflow-wrap:anywhere}
footer{margin-top:40px;color:var(--muted);font-size:12px}
figcaption .name{font-weight:600;color:var(--fg)}
figcaption .gate.pass{color:#166534}
figcaption .gate.fail{color:#991b1b;font-weight:600}
img.zoom{cursor:zoom-in}
.itable .controls{display:flex;flex-wrap:wrap;gap:6px 14px;align-items:center;margin:6px 0;font-size:13px}
.itable input.filter{width:260px;padding:3px 6px}
.itable .count{color:var(--muted)}
.itable th{cursor:pointer;user-select:none;white-space:nowrap}
.itable th[aria-sort=ascending]::after{content:" \\25B2";font-size:10px}
.itable th[aria-sort=descending]::after{content:" \\25BC";font-size:10px}
.itable td{white-space:nowrap;max-width:380px;overflow:hidden;text-overflow:ellipsis}
.itable .pager{display:flex;gap:6px;align-items:center;font-size:13px}
.itable .pager button{padding:2px 8px}
#lightbox{position:fixed;inset:0;background:rgba(17,24,39,.88);z-index:10;overflow:auto;cursor:zoom-out;
 display:flex;flex-direction:column;align-items:center;padding:20px}
#lightbox[hidden]{display:none}
#lightbox img{image-rendering:pixelated;background:#fff;margin:auto}
#lightbox .cap{color:#f9fafb;font-size:12.5px;margin-top:8px;overflow-wrap:anywhere}
"""

LIGHTBOX_JS = r"""
(function () {
  var full = JSON.parse(document.getElementById("full-images").textContent);
  var box = document.getElementById("lightbox");
  function close() { box.hidden = true; box.textContent = ""; }
  document.addEventListener("click", function (e) {
    var t = e.target;
    if (!box.hidden) { close(); return; }
    if (t.tagName !== "IMG" || !t.classList.contains("zoom")) return;
    var img = document.createElement("img"), cap = document.createElement("div");
    img.alt = t.alt;
    img.addEventListener("load", function () {  // small images enlarged by whole pixels
      var k = Math.max(1, Math.floor(512 / Math.max(img.naturalWidth, img.naturalHeight)));
      img.width = img.naturalWidth * k;
      img.height = img.naturalHeight * k;
    });
    img.src = full[t.dataset.full] || t.src;
    cap.className = "cap";
    cap.textContent = t.title.replace("; click for full size", "");
    box.appendChild(img); box.appendChild(cap); box.hidden = false;
  });
  document.addEventListener("keydown", function (e) { if (e.key === "Escape" && !box.hidden) close(); });
})();
"""


@dataclass
class Report:
    """The HTML, and the files it links to (paths relative to the HTML's folder): the full-size images when
    they are too large to embed."""

    html: str
    files: dict[str, bytes] = field(default_factory=dict)


def full_images(thumbs: Thumbnails, files_dir: str, embed_all: bool = False) -> tuple[dict[str, str], dict[str, bytes]]:
    """Where each full-size image opens from (key -> data URI, or a relative path under ``files_dir``) and the
    files to write beside the report; embedded while they total at most ``FULL_EMBED_BYTES`` (or always)."""
    if embed_all or sum(len(data) for data, _ in thumbs.full.values()) <= FULL_EMBED_BYTES:
        return {k: f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
                for k, (data, mime) in thumbs.full.items()}, {}
    ext = {"image/png": "png", "image/jpeg": "jpg"}
    files = {f"{files_dir}/{k}.{ext[mime]}": data for k, (data, mime) in thumbs.full.items()}
    return {k: quote(f"{files_dir}/{k}.{ext[mime]}") for k, (_, mime) in thumbs.full.items()}, files



def render_page(title: str, sections: list[Section], intro_html: str = "", full: dict[str, str] | None = None) -> str:
    """A complete HTML document of sections, with a table of contents; ``full``: where each thumbnail's
    full-size image opens from (:func:`full_images`)."""
    used: set[str] = set()
    ids = []
    for k, s in enumerate(sections):
        sid = _slug(s.id or s.heading)
        while sid in used:
            sid = f"{sid}-{k}"
        used.add(sid)
        ids.append(sid)
    nav = " ".join(f'<a href="#{sid}">{esc(s.heading)}</a>' for sid, s in zip(ids, sections))
    body = "".join(f'<section id="{sid}"><h2>{esc(s.heading)}</h2>{s.html}</section>'
                   for sid, s in zip(ids, sections))
    full_json = json.dumps(full or {}, separators=(",", ":")).replace("<", "\\u003c")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{esc(title)}</h1><nav>{nav}</nav>{intro_html}{body}"
            "<footer>Generated by bfr-curate. Self-contained: thumbnails are embedded lossless PNGs; a click opens "
            "the full-size image (embedded, or in the folder beside this file).</footer></main>"
            '<div id="lightbox" hidden></div>'
            f'<script type="application/json" id="full-images">{full_json}</script>'
            f"<script>{TABLE_JS}{LIGHTBOX_JS}</script></body></html>\n")


def report_sections(sets: list[ScoredSet], n_extremes: int = 8, thumbs: Thumbnails | None = None) -> list[Section]:
    """The standard sections of a quality report, in order."""
    sets = prepared(sets)
    thumbs = thumbs or Thumbnails()
    n = min(n_extremes, MAX_STRIP)
    summary = summary_section(sets)
    summary.html = f'<div class="scroll">{summary.html}</div>'
    optional = [protocol_section(sets), compare_section(sets)]
    return [sets_section(sets), summary, *[s for s in optional if s], not_computed_section(sets),
            set_metrics_section(sets), image_table_section(sets), histogram_section(sets),
            extremes_section(sets, n, thumbs), lineage_section(sets, n, thumbs), errors_section(sets),
            conventions_section(sets)]


def build_report(sets: list[ScoredSet], title: str = "bfr-curate quality report", n_extremes: int = 8,
                 thumb_size: int = 128, extra_sections: list[Section | tuple[str, str]] = (),
                 thumbs: Thumbnails | None = None, files_dir: str = "report_files", embed_all: bool = False) -> Report:
    """The whole report: the HTML and the full-size image files it links to (under ``files_dir``, relative to
    the HTML's folder; none while they fit ``FULL_EMBED_BYTES``). ``extra_sections``: Sections, or
    (heading, trusted html) pairs, appended after the standard sections; ``thumbs``: the Thumbnails the extra
    sections drew with, so their images open full size too; ``embed_all``: every full-size image embedded."""
    sets = prepared(sets)
    thumbs = thumbs or Thumbnails(thumb_size)
    sections = report_sections(sets, n_extremes, thumbs)
    sections += [x if isinstance(x, Section) else Section(str(x[0]), x[1]) for x in extra_sections]
    intro = ""
    missing = not_computed(sets)
    if missing:
        names = sorted({str(r.get("metric")) for r, _ in missing})
        intro = (f'<div class="banner"><b>{len(names)} metric{"s" if len(names) != 1 else ""} not computed</b> '
                 f'({esc(", ".join(names))}): see <a href="#not-computed">Not computed</a> for the file each '
                 "needs.</div>")
    if not sets:
        intro += _note("No manifests given.")
    full, files = full_images(thumbs, files_dir, embed_all)
    return Report(render_page(title, sections, intro, full), files)


def render_report(sets: list[ScoredSet], title: str = "bfr-curate quality report", n_extremes: int = 8,
                  thumb_size: int = 128, extra_sections: list[Section | tuple[str, str]] = ()) -> str:
    """The report as one HTML string with every full-size image embedded (:func:`build_report` and
    :func:`write_report` put large ones beside the HTML instead)."""
    return build_report(sets, title, n_extremes, thumb_size, extra_sections, embed_all=True).html


def files_dir_for(out_uri: str) -> str:
    """The folder beside a report for its full-size images: ``<report stem>_files``."""
    return posixpath.splitext(out_uri.rstrip("/").rsplit("/", 1)[-1])[0] + "_files"


def write_report(report: Report | str, out_uri: str) -> str:
    """Write the report atomically (local path or fsspec URL), its files first; returns the URI."""
    if isinstance(report, Report):
        folder = out_uri.rstrip("/").rsplit("/", 1)[0] if "/" in out_uri.rstrip("/") else "."
        for rel, data in report.files.items():
            storage.write_bytes_atomic(storage.join(folder, rel), data)
        report = report.html
    storage.write_bytes_atomic(out_uri, report.encode("utf-8"))
    return out_uri
