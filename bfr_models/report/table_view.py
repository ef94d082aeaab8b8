"""The per-image table: every row of every set, sortable by a click on a header, filterable by text and by
split, gate (and set), paginated so the page opens fast at 70k rows.

The rows travel as compact JSON inside the page (``<script type="application/json">``: categorical columns as
codes into their list of values, numbers with 6 decimals, ``"inf"``/``"-inf"`` for infinite values); the page's
script (``TABLE_JS``) renders one page of rows at a time. Without a script the table says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bfr_models.report.base import ScoredSet, Section, _all_metrics, _col, _missing, _note, esc, metric_direction

PAGE_ROWS = 100


@dataclass(frozen=True)
class Column:
    """A table column: ``kind`` is "text" (free text), "cat" (a few repeated values: a filter select) or "num"."""

    name: str
    kind: str = "text"
    direction: str | None = None  # "lower"/"higher" is better, for numeric metric columns
    title: str = ""


def _encoded(series: pd.Series, column: Column) -> tuple[list, list[str] | None]:
    """A column's JSON values: category codes (None for missing) with the category list, numbers (``"inf"``,
    ``"-inf"`` for infinite ones), or text."""
    if column.kind == "num":
        v = pd.to_numeric(series, errors="coerce").astype(float).to_numpy()
        return [None if x != x else ("inf" if x > 0 else "-inf") if np.isinf(x) else x for x in v.tolist()], None
    text = [None if _missing(x) else str(x) for x in series.tolist()]
    if column.kind != "cat":
        return text, None
    cats = sorted({x for x in text if x is not None})
    code = {x: i for i, x in enumerate(cats)}
    return [None if x is None else code[x] for x in text], cats


def table_json(frame: pd.DataFrame, columns: list[Column]) -> str:
    """``{"columns": [{name, kind, dir, values}], "rows": [[...], ...]}`` as compact JSON, safe inside <script>."""
    encoded, meta = {}, []
    for i, c in enumerate(columns):
        encoded[i], cats = _encoded(_col(frame, c.name), c)
        meta.append({"name": c.name, "kind": c.kind, "dir": c.direction, "title": c.title,
                     **({"values": cats} if cats is not None else {})})
    rows = pd.DataFrame(encoded, index=range(len(frame)), dtype=object).to_json(orient="values", double_precision=6)
    head = json.dumps(meta, separators=(",", ":"))
    return ('{"columns":' + head + ',"rows":' + rows + "}").replace("<", "\\u003c")  # never "</script>"


def data_table(table_id: str, frame: pd.DataFrame, columns: list[Column], page_rows: int = PAGE_ROWS,
               filters: tuple[str, ...] = ()) -> str:
    """The HTML of a sortable, filterable, paginated table of ``frame`` (rendered by ``TABLE_JS``); ``filters``
    are the categorical columns that get a select."""
    heads = "".join(f'<th data-col="{i}" class="{"num" if c.kind == "num" else ""}" title="{esc(c.title or "sort")}">'
                    f'{esc(c.name)}{_arrow(c.direction)}</th>' for i, c in enumerate(columns))
    selects = []
    for name in filters:
        j = next((i for i, c in enumerate(columns) if c.name == name and c.kind == "cat"), None)
        if j is not None:
            selects.append(f'<label>{esc(name)} <select data-col="{j}"><option value="">all</option></select></label>')
    return (f'<div class="itable" id="{esc(table_id)}" data-page-rows="{int(page_rows)}">'
            '<div class="controls"><input type="search" class="filter" placeholder="filter: text, or niqe&lt;5 lf_psnr&gt;=27" '
            f'aria-label="filter rows">{"".join(selects)}<span class="count"></span></div>'
            '<div class="pager"><button type="button" class="first">«</button><button type="button" class="prev">‹ prev'
            '</button><span class="pageinfo"></span><button type="button" class="next">next ›</button>'
            '<button type="button" class="last">»</button></div>'
            f'<div class="scroll"><table class="rows-table"><thead><tr>{heads}</tr></thead><tbody></tbody></table></div>'
            '<noscript><p class="note">This table needs JavaScript.</p></noscript>'
            f'<script type="application/json" class="rows">{table_json(frame, columns)}</script></div>')


def _arrow(direction: str | None) -> str:
    return {"lower": ' <span class="dir">↓</span>', "higher": ' <span class="dir">↑</span>'}.get(direction or "", "")


def image_table_section(sets: list[ScoredSet], page_rows: int = PAGE_ROWS) -> Section:
    """Every row of every set: set, source name, split, status, gate and its reason, every metric."""
    frames = [s.frame.assign(set=s.name) for s in sets if len(s.frame)]
    if not frames:
        return Section("Images", _note("No rows."), "images")
    frame = pd.concat(frames, ignore_index=True, sort=False)
    metrics = _all_metrics(sets)
    columns = [Column("set", "cat")] if len(sets) > 1 else []
    columns += [Column("source_name", title="the input file's name, carried down the lineage"),
                Column("image_id"), Column("split", "cat")]
    if (_col(frame, "status") != "ok").any():
        columns += [Column("status", "cat"), Column("error")]
    if "gate" in frame.columns:
        columns += [Column("gate", "cat"), Column("gate_reason")]
    columns += [Column(m, "num", metric_direction(m), f"{metric_direction(m)} is better") for m in metrics]
    intro = _note(f"{len(frame)} rows, {page_rows} per page. Click a header to sort (again to reverse; missing "
                  "values last). The filter keeps rows that match every word: text found in any text column, or a "
                  "condition on a metric such as niqe<5 or lf_psnr>=27.")
    return Section(f"Images ({len(frame)})", intro + data_table("image-table", frame, columns, page_rows,
                                                               ("set", "split", "status", "gate")), "images")


TABLE_JS = r"""
(function () {
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
    return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]; }); }
  function num(v) {
    if (v === null || v === undefined) return null;
    if (typeof v === "string") return v.charAt(0) === "-" ? -Infinity : Infinity;
    return v;
  }
  function show(v) {
    if (v === null) return "\u2014";
    if (!isFinite(v)) return v > 0 ? "inf" : "-inf";
    return String(Number(v.toPrecision(4)));
  }
  document.querySelectorAll(".itable").forEach(function (box) {
    var data = JSON.parse(box.querySelector("script.rows").textContent);
    var cols = data.columns, per = Number(box.dataset.pageRows) || 100;
    var rows = data.rows.map(function (r, i) {  // numbers decoded once; i keeps ties in their given order
      var out = r.map(function (v, j) { return cols[j].kind === "num" ? num(v) : v; });
      out.i = i;
      return out;
    });
    var text = rows.map(function (r) {
      return r.map(function (v, j) {
        if (v === null || cols[j].kind === "num") return "";
        return cols[j].kind === "cat" ? cols[j].values[v] : v;
      }).join("\u0001").toLowerCase();
    });
    var state = {col: -1, dir: 1, page: 0, terms: [], cats: {}};
    var view = rows;
    var tbody = box.querySelector("tbody"), info = box.querySelector(".pageinfo");
    var count = box.querySelector(".count"), heads = box.querySelectorAll("th");
    box.querySelectorAll("select").forEach(function (sel) {
      var j = Number(sel.dataset.col);
      cols[j].values.forEach(function (v, code) {
        var o = document.createElement("option"); o.value = String(code); o.textContent = v; sel.appendChild(o);
      });
      if (rows.some(function (r) { return r[j] === null; })) {
        var o = document.createElement("option"); o.value = "none"; o.textContent = "(none)"; sel.appendChild(o);
      }
      sel.addEventListener("change", function () { state.cats[j] = sel.value; state.page = 0; update(); });
    });
    var numeric = {};
    cols.forEach(function (c, j) { if (c.kind === "num") numeric[c.name.toLowerCase()] = j; });
    function parse(query) {  // "niqe<5 severe": a condition on a numeric column, or text to find
      return query.split(/\s+/).filter(Boolean).map(function (word) {
        var m = /^([a-z0-9_]+)(<=|>=|<|>|=)(-?[0-9.]+(?:e[-+]?[0-9]+)?)$/.exec(word);
        if (m && m[1] in numeric) return {col: numeric[m[1]], op: m[2], value: Number(m[3])};
        return {text: word};
      });
    }
    function holds(v, t) {
      if (v === null) return false;
      return t.op === "<" ? v < t.value : t.op === ">" ? v > t.value : t.op === "<=" ? v <= t.value :
        t.op === ">=" ? v >= t.value : v === t.value;
    }
    function keep(r) {
      for (var j in state.cats) {
        var want = state.cats[j];
        if (want === "") continue;
        if (want === "none" ? r[j] !== null : r[j] !== Number(want)) return false;
      }
      return state.terms.every(function (t) {
        return t.text === undefined ? holds(r[t.col], t) : text[r.i].indexOf(t.text) >= 0;
      });
    }
    function compare(a, b) {
      var j = state.col, c = cols[j], x = a[j], y = b[j];
      if (x === null || y === null) return x === y ? a.i - b.i : (x === null ? 1 : -1);  // missing last
      if (c.kind === "cat") { x = c.values[x]; y = c.values[y]; }
      var d = x < y ? -1 : (x > y ? 1 : 0);
      return d ? d * state.dir : a.i - b.i;
    }
    function update() {
      view = rows.filter(keep);
      if (state.col >= 0) view.sort(compare);
      render();
    }
    function render() {
      var pages = Math.max(1, Math.ceil(view.length / per));
      state.page = Math.min(Math.max(0, state.page), pages - 1);
      var start = state.page * per, part = view.slice(start, start + per), html = [];
      part.forEach(function (r) {
        html.push("<tr>" + r.map(function (v, j) {
          var c = cols[j];
          if (c.kind === "num") return '<td class="num">' + show(v) + "</td>";
          if (v === null) return "<td>\u2014</td>";
          return "<td>" + esc(c.kind === "cat" ? c.values[v] : v) + "</td>";
        }).join("") + "</tr>");
      });
      tbody.innerHTML = html.join("");
      info.textContent = "page " + (state.page + 1) + " of " + pages + " \u00b7 rows " +
        (view.length ? start + 1 : 0) + "\u2013" + (start + part.length) + " of " + view.length;
      count.textContent = view.length === rows.length ? rows.length + " rows" : view.length + " of " + rows.length + " rows";
      box.querySelector(".prev").disabled = box.querySelector(".first").disabled = state.page === 0;
      box.querySelector(".next").disabled = box.querySelector(".last").disabled = state.page >= pages - 1;
      heads.forEach(function (th, j) {
        th.setAttribute("aria-sort", j === state.col ? (state.dir > 0 ? "ascending" : "descending") : "none");
      });
      box.dataset.state = JSON.stringify({sort: state.col >= 0 ? cols[state.col].name : null,
        dir: state.dir > 0 ? "asc" : "desc", page: state.page + 1, pages: pages, rows: view.length});
    }
    heads.forEach(function (th) {
      th.addEventListener("click", function () {
        var j = Number(th.dataset.col);
        state.dir = state.col === j ? -state.dir : 1;
        state.col = j; state.page = 0; update();
      });
    });
    var timer = null;
    box.querySelector("input.filter").addEventListener("input", function (e) {
      clearTimeout(timer);
      timer = setTimeout(function () { state.terms = parse(e.target.value.toLowerCase()); state.page = 0; update(); }, 120);
    });
    box.querySelector(".first").addEventListener("click", function () { state.page = 0; render(); });
    box.querySelector(".prev").addEventListener("click", function () { state.page -= 1; render(); });
    box.querySelector(".next").addEventListener("click", function () { state.page += 1; render(); });
    box.querySelector(".last").addEventListener("click", function () { state.page = 1e9; render(); });
    render();
  });
})();
"""
