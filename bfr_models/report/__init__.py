"""The quality report: summary tables, a per-image table, histograms, best/worst and lineage images, as HTML.

One HTML file with inline CSS, JS and SVG and lossless (PNG) thumbnails embedded as data URIs, built from
sections so later stages can add their own::

    report = build_report(sets, extra_sections=[("Pseudo targets", body_html)])
    write_report(report, "out/report.html")

Clicking a thumbnail opens the full-resolution image: embedded too while the shown images are small in total
(``FULL_EMBED_BYTES``), else copied into ``<report stem>_files/`` beside the HTML (relative links, so the folder
opens from disk). Every section builder returns a ``Section``; ``render_page`` assembles any list of them. No
Prefect here: the report flow publishes ``summary_table`` and ``summary_markdown`` as Prefect artifacts.

Modules: ``base`` (sets, sections, metric columns, formatting), ``tables`` (summary and the other tables),
``table_view`` (the sortable, filterable, paginated per-image table), ``charts`` (SVG histograms), ``images``
(thumbnails, best/worst, lineage strips), ``compare`` (paired per-image deltas), ``page`` (the document).

Conventions of the report itself (also printed in the report):
- a metric column is a numeric column named after a known metric, optionally with a suffix
  (``psnr``, ``psnr_y``); whether lower or higher is better comes from ``METRIC_DIRECTIONS``;
- means and medians skip missing values (pandas' defaults); an infinite value (the PSNR of two
  identical images) is kept, so a mean can be ``inf``;
- histograms pool the finite values of all plotted series to choose the bins; infinite values are
  counted beside the plot;
- best/worst ties are broken by ``image_id``, so the same manifest always gives the same report; with fewer
  than twice the strip length, best and worst split the ranked images (no image in both);
- a clean stage's ``*_after`` scores count only where the candidate was accepted (the image the row keeps).
"""

from bfr_models.report.base import (METRIC_DIRECTIONS, PALETTE, Markup, ScoredSet, Section, _note, _slug, _swatch, esc,
                                    fmt, html_table, metric_base, metric_columns, metric_direction)
from bfr_models.report.charts import _tick_label, histogram_edges, nice_ticks, svg_histogram
from bfr_models.report.compare import paired_deltas
from bfr_models.report.images import Thumbnails, _figure
from bfr_models.report.page import FULL_EMBED_BYTES, Report, build_report, render_page, render_report, write_report
from bfr_models.report.tables import (DIFBFSR_TABLE1, protocol_table, search_section, summary_markdown,
                                      summary_table)

__all__ = ["DIFBFSR_TABLE1", "FULL_EMBED_BYTES", "METRIC_DIRECTIONS", "PALETTE", "Markup", "Report", "ScoredSet",
           "Section", "Thumbnails", "_figure", "_note", "_slug", "_swatch", "_tick_label", "build_report", "esc", "fmt",
           "histogram_edges", "html_table", "metric_base", "metric_columns", "metric_direction", "nice_ticks",
           "paired_deltas", "protocol_table", "render_page", "render_report", "search_section", "summary_markdown",
           "summary_table", "svg_histogram", "write_report"]
