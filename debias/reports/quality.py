"""The self-contained HTML page of ``debias quality``: metrics per group, a bar chart, generated images next to real
ones, and CycleGAN source -> translated pairs.

Same rules as the audit report (:mod:`debias.reports.audit`, whose stylesheet, content-security policy, image helpers
and template environment it reuses): every image and plot is an inline data URI and nothing is fetched. The markup is
templates/quality_report.html; this module prepares plain data for it, and autoescaping keeps all text from the data
out of the markup.
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
    TEMPLATES,
    figure_to_data_uri,
    format_value,
    image_grid_data,
    summary_rows,
)
from debias.runtime.checkpoint import atomic_write_text

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


def _cell(key: str, row: dict[str, object]) -> dict[str, object]:
    """One cell of the metrics table: its text, and whether it is a number (right-aligned)."""
    if key == "kid":
        mean, std = _num(row.get("kid_mean")), _num(row.get("kid_std"))
        return {"num": True, "text": "n/a" if mean is None else f"{mean:.4g} ± {std or 0.0:.2g}"}
    value = row.get(key)
    if key in ("method", "group", "note"):
        return {"num": False, "text": "" if value is None else str(value)}
    return {"num": True, "text": format_value(value)}


def _chart(rows: list[dict[str, object]]) -> dict[str, str] | None:
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    groups = list(dict.fromkeys(str(r["group"]) for r in rows))[:_MAX_CHART_GROUPS]
    if not groups:
        return None
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
    return {"uri": figure_to_data_uri(fig), "alt": "metrics per group"}


def _cas_section(cas: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    out = []
    for method, res in cas.items():
        acc = _num(res.get("accuracy"))
        notes = []
        if res.get("reason"):
            notes.append(str(res["reason"]))
        if res.get("missing_classes"):
            notes.append(f"real labels without generated images (always wrong): {res['missing_classes']}")
        per_group = res.get("per_group") or {}
        out.append({
            "method": str(method),
            "accuracy": format_value(acc) if acc is not None else "n/a",
            "notes": notes,
            "per_group": [(str(g), format_value(v.get("n")), format_value(v.get("accuracy")))
                          for g, v in per_group.items()],  # type: ignore[union-attr]
        })
    return out


def _grid_section(grids: list[GroupImages]) -> list[dict[str, object]]:
    cols = 8
    return [
        {"method": str(g.method), "group": str(g.group), "generated": image_grid_data(g.generated, cols),
         "real": image_grid_data(g.real, cols) if len(g.real) else None}
        for g in grids
    ]


def _pairs_section(page: QualityPage) -> dict[str, object] | None:
    if page.pairs is None and not page.pairs_note:
        return None
    grid = None
    if page.pairs is not None and len(page.pairs):
        flat = page.pairs.reshape(-1, *page.pairs.shape[2:])
        captions = [c for pair in page.pair_captions for c in pair]
        grid = image_grid_data(flat, ncols=6, captions=captions)  # three pairs per row
    return {"note": str(page.pairs_note or ""), "grid": grid}


def render_quality_html(page: QualityPage) -> str:
    """The whole page as one HTML string, from templates/quality_report.html."""
    html = TEMPLATES.get_template("quality_report.html").render(
        title=str(page.title), csp=PAGE_CSP, css=PAGE_CSS,
        summary=summary_rows(page.summary),
        feature_note=str(page.feature_note),
        metric_headings=[h for _, h in METRIC_COLUMNS],
        metric_rows=[[_cell(k, r) for k, _ in METRIC_COLUMNS] for r in page.metrics],
        chart=_chart(page.metrics),
        cas=_cas_section(page.cas),
        grids=_grid_section(page.grids),
        pairs=_pairs_section(page),
    )
    return html + "\n"


def write_quality_html(page: QualityPage, path: str | Path) -> Path:
    """Write the page atomically (temporary sibling, then rename) and return its path."""
    out = Path(path)
    atomic_write_text(render_quality_html(page), out)
    return out
