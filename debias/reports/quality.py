"""The self-contained HTML page of ``debias quality``: metrics per group, a bar chart, generated images next to real
ones, and CycleGAN source -> translated pairs.

Same rules as the audit report (:mod:`debias.reports.audit`, whose stylesheet, content-security policy and image helpers
it reuses): every image and plot is an inline data URI, nothing is fetched, and all text from the data is escaped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from debias.reports.audit import (
    PAGE_CSP,
    PAGE_CSS,
    escape_html,
    figure_to_data_uri,
    format_summary_value,
    format_value,
    image_grid,
)

__all__ = ["GroupImages", "QualityPage", "render_quality_html", "write_quality_html"]

METRIC_COLUMNS = [  # (key in a metrics row, column heading)
    ("method", "method"),
    ("group", "group"),
    ("n_real", "real images"),
    ("n_fake", "generated images"),
    ("fid", "FID ↓"),
    ("kid", "KID ↓ (mean ± std)"),
    ("kid_subset_size", "KID subset"),
    ("precision", "precision ↑"),
    ("recall", "recall ↑"),
    ("pr_n", "images per side (P/R)"),
    ("note", "note"),
]
_CHART_METRICS = [("fid", "FID (lower is better)"), ("kid_mean", "KID (lower is better)"),
                  ("precision", "precision (higher is better)"), ("recall", "recall (higher is better)")]
_MAX_CHART_GROUPS = 30


@dataclass
class GroupImages:
    """Sample images of one group: generated ones and real ones for comparison, uint8 (n, H, W, C)."""

    method: str
    group: str
    generated: np.ndarray
    real: np.ndarray


@dataclass
class QualityPage:
    title: str
    summary: dict[str, object]
    metrics: list[dict[str, object]]  # one row per (method, group): keys of METRIC_COLUMNS, kid_mean, kid_std
    cas: dict[str, dict[str, object]] = field(default_factory=dict)  # method -> CasResult as dict
    grids: list[GroupImages] = field(default_factory=list)
    pairs: np.ndarray | None = None  # (n, 2, H, W, C) uint8: CycleGAN source, translated
    pair_captions: list[tuple[str, str]] = field(default_factory=list)
    pairs_note: str = ""
    feature_note: str = ""


def _num(value: object) -> float | None:
    if value is None:
        return None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _cell(key: str, row: dict[str, object]) -> str:
    if key == "kid":
        mean, std = _num(row.get("kid_mean")), _num(row.get("kid_std"))
        if mean is None:
            return '<td class="num">n/a</td>'
        return f'<td class="num">{mean:.4g} ± {std or 0.0:.2g}</td>'
    value = row.get(key)
    if key in ("method", "group", "note"):
        return f"<td>{escape_html('' if value is None else value)}</td>"
    return f'<td class="num">{escape_html(format_value(value))}</td>'


def _metrics_table(rows: list[dict[str, object]]) -> str:
    head = "".join(f"<th>{escape_html(h)}</th>" for _, h in METRIC_COLUMNS)
    body = "".join("<tr>" + "".join(_cell(k, r) for k, _ in METRIC_COLUMNS) + "</tr>" for r in rows)
    return f'<div class="scroll"><table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _chart(rows: list[dict[str, object]]) -> str:
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    groups = list(dict.fromkeys(str(r["group"]) for r in rows))[:_MAX_CHART_GROUPS]
    if not groups:
        return ""
    lookup = {(str(r["method"]), str(r["group"])): r for r in rows}
    fig = Figure(figsize=(11, 6.2))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(groups))
    for i, (key, title) in enumerate(_CHART_METRICS):
        ax = fig.add_subplot(2, 2, i + 1)
        for j, method in enumerate(methods):
            values = [_num(lookup.get((method, g), {}).get(key)) for g in groups]
            heights = [np.nan if v is None else v for v in values]
            ax.bar(x + (j - (len(methods) - 1) / 2) * width, heights, width, label=method.replace("$", r"\$"))
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels([g.replace("$", r"\$")[:20] for g in groups], rotation=30, ha="right", fontsize=8)
        if key in ("precision", "recall"):
            ax.set_ylim(0, 1.05)
        if i == 0 and len(methods) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    uri = figure_to_data_uri(fig)
    return f'<img class="plot" src="{uri}" alt="metrics per group">'


def _cas_section(cas: dict[str, dict[str, object]]) -> str:
    if not cas:
        return ""
    parts = ['<section id="cas"><h2>Classification accuracy score</h2><p class="muted">A classifier trained only on '
             "the generated images and their labels, tested on the real images: high when the generated images "
             "carry what tells the classes apart in real data.</p>"]
    for method, res in cas.items():
        acc = _num(res.get("accuracy"))
        shown = escape_html(format_value(acc)) if acc is not None else "n/a"
        line = f"<h3>{escape_html(method)}: accuracy {shown}</h3>"
        notes = []
        if res.get("reason"):
            notes.append(str(res["reason"]))
        if res.get("missing_classes"):
            notes.append(f"real labels without generated images (always wrong): {res['missing_classes']}")
        note = "".join(f'<p class="muted">{escape_html(n)}</p>' for n in notes)
        per_group = res.get("per_group") or {}
        table = ""
        if per_group:
            body = "".join(
                f'<tr><td>{escape_html(g)}</td><td class="num">{escape_html(format_value(v.get("n")))}</td>'
                f'<td class="num">{escape_html(format_value(v.get("accuracy")))}</td></tr>'
                for g, v in per_group.items()  # type: ignore[union-attr]
            )
            table = ('<table class="data"><thead><tr><th>group</th><th>real images</th><th>accuracy</th></tr>'
                     f"</thead><tbody>{body}</tbody></table>")
        parts.append(line + note + table)
    return "".join(parts) + "</section>"


def _grid_section(grids: list[GroupImages]) -> str:
    if not grids:
        return ""
    parts = ['<section id="images"><h2>Generated images</h2><p class="muted">Per group: generated images, and real '
             "images of the same group below them for comparison.</p>"]
    for g in grids:
        parts.append(f"<h3>{escape_html(g.method)} · {escape_html(g.group)}</h3>")
        cols = 8
        parts.append("<p class=\"muted\">generated</p>" + image_grid(g.generated, cols))
        if len(g.real):
            parts.append("<p class=\"muted\">real</p>" + image_grid(g.real, cols))
    return "".join(parts) + "</section>"


def _pairs_section(page: QualityPage) -> str:
    if page.pairs is None and not page.pairs_note:
        return ""
    parts = ['<section id="pairs"><h2>CycleGAN: source → translated</h2>']
    if page.pairs_note:
        parts.append(f'<p class="muted">{escape_html(page.pairs_note)}</p>')
    if page.pairs is not None and len(page.pairs):
        flat = page.pairs.reshape(-1, *page.pairs.shape[2:])
        captions = [c for pair in page.pair_captions for c in pair]
        parts.append(image_grid(flat, ncols=6, captions=captions))  # three pairs per row
    return "".join(parts) + "</section>"


def render_quality_html(page: QualityPage) -> str:
    summary_rows = "".join(
        f"<tr><th>{escape_html(k)}</th><td>{format_summary_value(v)}</td></tr>" for k, v in page.summary.items()
    )
    metrics = (
        '<section id="metrics"><h2>Metrics per group</h2>'
        f'<p class="muted">{escape_html(page.feature_note)}</p>' + _metrics_table(page.metrics) + _chart(page.metrics)
        + "</section>"
    )
    sections = [
        f'<section id="summary"><h2>Summary</h2><table class="kv">{summary_rows}</table></section>',
        metrics,
        _cas_section(page.cas),
        _grid_section(page.grids),
        _pairs_section(page),
    ]
    title = escape_html(page.title)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{PAGE_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title}</title><style>{PAGE_CSS}</style></head>\n<body><main><h1>{title}</h1>\n"
        + "\n".join(s for s in sections if s)
        + "\n</main></body></html>\n"
    )


def write_quality_html(page: QualityPage, path: str | Path) -> Path:
    """Write the page atomically (temporary sibling, then rename) and return its path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(render_quality_html(page), encoding="utf-8")
    tmp.replace(out)
    return out
