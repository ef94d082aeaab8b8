"""Images in the report: lossless thumbnails that open the full-resolution image, best/worst strips and the
lineage strips (clean | degraded | target)."""

from __future__ import annotations

import base64
import hashlib
import io

import numpy as np
import pandas as pd
from PIL import Image

from bfr_models import storage
from bfr_models.imageio import decode_rgb
from bfr_models.report.base import (PALETTE, ScoredSet, Section, _all_metrics, _col, _missing, _note, _slug, _status,
                                    _swatch, _text, esc, fmt, metric_columns, metric_direction)

# --------------------------------------------------------------------------------------------
# thumbnails

_BROWSER_IMAGES = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"))


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def viewable(data: bytes, rgb) -> tuple[bytes, str]:
    """An image as a browser shows it without loss: its own bytes when PNG or JPEG (the file as it is), else
    the PNG of the decoded pixels."""
    for magic, mime in _BROWSER_IMAGES:
        if data.startswith(magic):
            return data, mime
    return _png(rgb), "image/png"


class Thumbnails:
    """Lossless thumbnails: the PNG of a LANCZOS-downscaled copy, or the image itself when it is no larger than
    the thumbnail. Each image is read and decoded once per report; the full-resolution images the thumbnails
    open are kept in ``full`` (key -> bytes, MIME type). An image that can't be read becomes a placeholder
    with the reason, never an exception."""

    def __init__(self, size: int = 128):
        self.size = max(16, int(size))
        self._cache: dict[str, tuple[str, int, int, str | None] | str] = {}
        self.full: dict[str, tuple[bytes, str]] = {}

    def _encode(self, uri: str) -> tuple[str, int, int, str | None] | str:
        if uri not in self._cache:
            try:
                data = storage.read_bytes(uri)
                rgb, _ = decode_rgb(data)
                h, w = rgb.shape[:2]
                if max(w, h) <= self.size:  # the thumbnail is the full image
                    self._cache[uri] = (_data_uri(*viewable(data, rgb)), w, h, None)
                else:
                    im = Image.fromarray(rgb)
                    im.thumbnail((self.size, self.size), Image.LANCZOS)
                    key = hashlib.sha1(uri.encode()).hexdigest()[:16]
                    self.full[key] = viewable(data, rgb)
                    self._cache[uri] = (_data_uri(_png(np.asarray(im)), "image/png"), w, h, key)
            except Exception as e:  # noqa: BLE001 -- any unreadable image is a placeholder
                self._cache[uri] = f"{type(e).__name__}: {e}"[:300]
        return self._cache[uri]

    def img(self, uri, alt: str = "") -> str:
        """An <img> (data: URI) fitted in a size x size box, or a placeholder <div>. A click opens the
        full-resolution image (``data-full``: its key in ``full``; none when the thumbnail is the image)."""
        if _missing(uri) or not str(uri):
            return self.placeholder("no image URI")
        got = self._encode(str(uri))
        if isinstance(got, str):
            return self.placeholder(got)
        data, w, h, key = got
        scale = self.size / max(w, h)
        dw, dh = max(1, round(w * scale)), max(1, round(h * scale))
        cls = "zoom up" if scale > 1 else "zoom"
        full = f' data-full="{key}"' if key else ""
        return (f'<img class="{cls}" src="{data}" width="{dw}" height="{dh}" alt="{esc(alt)}"{full} '
                f'title="{esc(uri)} ({w}x{h}; click for full size)">')

    def placeholder(self, reason: str) -> str:
        s = self.size
        return (f'<div class="ph" style="width:{s}px;height:{s}px" title="{esc(reason)}">'
                f'image unavailable<br><small>{esc(reason[:80])}</small></div>')


def _figure(thumbs: Thumbnails, uri, image_id, caption_html: str, attrs: str = "") -> str:
    return (f'<figure class="thumb"{attrs}>{thumbs.img(uri, alt=_text(image_id) or "")}'
            f'<figcaption style="max-width:{thumbs.size}px">{caption_html}</figcaption></figure>')


def _ordered(frame: pd.DataFrame, metric: str, best: bool) -> pd.DataFrame:
    """Rows with a value, best-first or worst-first; ties by image_id."""
    rows = frame[pd.to_numeric(frame[metric], errors="coerce").notna()].copy()
    rows["_v"] = pd.to_numeric(rows[metric], errors="coerce").astype(float)
    rows["_id"] = _col(rows, "image_id").astype(str)
    ascending = (metric_direction(metric) == "lower") == best
    return rows.sort_values(["_v", "_id"], ascending=[ascending, True], kind="mergesort")


def _caption(row, metric: str | None = None) -> str:
    """The metric value (when given), the source name or image_id, the split and the quality gate's verdict."""
    parts = []
    if metric is not None:
        parts.append(f'<b>{esc(metric)} {esc(fmt(row.get(metric)))}</b>')
    iid = _text(row.get("image_id")) or "?"
    name = _text(row.get("source_name"))
    parts.append(f'<span class="name" title="{esc(iid)}">{esc(name)}</span>' if name
                 else f'<span class="id" title="{esc(iid)}">{esc(iid[:14])}</span>')
    split = _text(row.get("split"))
    if split:
        parts.append(f'<span class="split">{esc(split)}</span>')
    gate = _text(row.get("gate"))
    if gate:
        reason = _text(row.get("gate_reason"))
        parts.append(f'<span class="gate {esc(gate)}" title="{esc(reason or "")}">gate {esc(gate)}'
                     f'{": " + esc(reason) if reason else ""}</span>')
    return "<br>".join(parts)


def best_and_worst(frame: pd.DataFrame, metric: str, n: int) -> dict[str, pd.DataFrame]:
    """The n best and n worst rows of a metric, never the same row in both: with fewer than 2n ranked rows
    each gets half (the middle one of an odd count goes to neither)."""
    best = _ordered(frame, metric, best=True)
    k = min(n, len(best) // 2) if len(best) > 1 else len(best)
    best = best.head(k)
    worst = _ordered(frame, metric, best=False)
    worst = worst[~worst.index.isin(best.index)] if len(worst) > 1 else worst.iloc[:0]
    return {"worst": worst.head(k), "best": best}


def extremes_section(sets: list[ScoredSet], n: int = 8, thumbs: Thumbnails | None = None) -> Section:
    thumbs = thumbs or Thumbnails()
    metrics = _all_metrics(sets)
    if not metrics or n <= 0:
        return Section("Worst and best images", _note("No metric columns to rank by."), "extremes")
    blocks = []
    for m in metrics:
        blocks.append(f'<h3>{esc(m)} <span class="dir">({esc(metric_direction(m))} is better)</span></h3>')
        for i, s in enumerate(sets):
            if m not in s.frame.columns:
                continue
            ranked = best_and_worst(s.frame, m, n)
            if len(ranked["best"]) == 0:
                continue
            label = f"{_swatch(PALETTE[i % len(PALETTE)])}{esc(s.name)}" if len(sets) > 1 else ""
            for kind, rows in ranked.items():
                if not len(rows):
                    continue
                figs = [_figure(thumbs, r.get("uri"), r.get("image_id"), _caption(r, m),
                                f' data-image-id="{esc(_text(r.get("image_id")) or "")}"')
                        for r in rows.to_dict("records")]
                blocks.append(f'<div class="strip" id="{kind}-{_slug(m)}-{i}" data-kind="{kind}" '
                              f'data-metric="{esc(m)}" data-set="{esc(s.name)}"><div class="strip-head">'
                              f'{label} <span class="kind {kind}">{kind} {len(rows)}</span></div>'
                              f'<div class="thumbs">{"".join(figs)}</div></div>')
    note = _note(f"Up to {n} per metric and set; with fewer than {2 * n} images best and worst share them out.")
    return Section("Worst and best images", note + "".join(blocks), "extremes")


def _spread_over_splits(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to n rows, taken round-robin over the splits (each split in image_id order)."""
    split = _col(frame, "split").astype(object)
    split = split.where(split.notna(), "")
    order = _col(frame, "image_id").astype(str)
    queues = [list(order[split == k].sort_values(kind="mergesort").index[:n]) for k in sorted(set(split))]
    picked = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop(0))
    return frame.loc[picked]


# what an image is in a lineage strip, by the stage that made it
LINEAGE_LABELS = {"ingest": "clean", "clean": "cleaned", "degrade": "degraded", "pseudo-targets": "target",
                  "restore": "restored"}


def lineage_chain(row: dict, lineage: pd.DataFrame | None, depth: int = 3) -> list[tuple[str, str | None, str | None]]:
    """``(label, uri, image_id)`` of a row and up to ``depth - 1`` ancestors, oldest first: the parent from the
    row's ``parent_uri``, older ones through ``lineage`` (rows of the manifests the set descends from, indexed by
    image_id). An ancestor from no manifest (a file of an input folder) is "clean" when a degrade stage read it,
    else the "original"."""
    stage = _text(row.get("stage"))
    chain = [(LINEAGE_LABELS.get(stage or "", stage or "image"), _text(row.get("uri")), _text(row.get("image_id")))]
    parent_id, parent_uri = _text(row.get("parent_id")), _text(row.get("parent_uri"))
    while parent_uri and len(chain) < depth:
        known = lineage is not None and parent_id is not None and parent_id in lineage.index
        up = lineage.loc[parent_id] if known else {}
        child, stage = stage, (_text(up.get("stage")) if known else None)
        label = LINEAGE_LABELS.get(stage or "", stage) or ("clean" if child == "degrade" else "original")
        chain.append((label, parent_uri, parent_id))
        parent_id, parent_uri = (_text(up.get("parent_id")), _text(up.get("parent_uri"))) if known else (None, None)
    return chain[::-1]


def lineage_section(sets: list[ScoredSet], n: int = 8, thumbs: Thumbnails | None = None) -> Section:
    """Strips of each sampled image beside its ancestors: clean | degraded | target for pseudo targets,
    clean | degraded for degraded images (up to n per set, spread over the splits)."""
    thumbs = thumbs or Thumbnails()
    blocks = []
    for i, s in enumerate(sets):
        f = s.frame
        if len(f) == 0 or "parent_uri" not in f.columns or n <= 0:
            continue
        parent = f["parent_uri"].astype(object)
        has = parent.notna() & (parent.astype(str) != "") & (_status(f) == "ok") & _col(f, "uri").notna()
        if not has.any():
            continue
        metrics = metric_columns(f)
        strips = []
        for r in _spread_over_splits(f[has], n).to_dict("records"):
            values = " · ".join(f"{m} {fmt(r.get(m))}" for m in metrics if not _missing(r.get(m)))
            figs = []
            for label, uri, image_id in lineage_chain(r, s.lineage):
                caption = f"<i>{esc(label)}</i>"
                if image_id == _text(r.get("image_id")):
                    caption += "<br>" + _caption(r) + (f'<br><span class="vals">{esc(values)}</span>' if values else "")
                figs.append(_figure(thumbs, uri, image_id, caption))
            strips.append(f'<div class="pair" data-image-id="{esc(_text(r.get("image_id")) or "")}">'
                          f'{"".join(figs)}</div>')
        head = f"<h3>{_swatch(PALETTE[i % len(PALETTE)])}{esc(s.name)}</h3>" if len(sets) > 1 else ""
        blocks.append(f'{head}<div class="pairs">{"".join(strips)}</div>')
    title = "Lineage: clean | degraded | target"
    if not blocks:
        return Section(title, _note("No rows with a known parent image."), "lineage")
    return Section(title, _note(f"Each strip: an image (right) after its ancestors from the manifests it descends "
                                f"from (up to {n} per set, spread over the splits). Click an image for full size.")
                   + "".join(blocks), "lineage")
