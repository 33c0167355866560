"""Self-contained HTML audit report: what the dataset has little of, and how the weights respond.

Everything (plots, sample images, CSS) is inlined so the file can be mailed, attached to a ticket
or opened offline years later; the report must never fetch anything. Plots are drawn on
`matplotlib.figure.Figure` objects directly instead of through pyplot: that needs no global
backend switch (so importing this module cannot disturb a caller's interactive matplotlib) and
the figures are not registered anywhere, so they are freed as soon as we drop them.

The markup lives in Jinja2 templates (templates/audit_report.html, with the page frame and the
shared macros in report_base.html and report_macros.html); this module only prepares plain data
(strings, numbers, data: URIs) for them. The environment autoescapes, so text that can come from
user data (paths, metadata values, column names, captions, labels) can never become markup. The
same text goes through `_mpl_text` before it reaches matplotlib (where an unbalanced "$" would
otherwise be parsed as mathtext and raise).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import NullFormatter
from PIL import Image

from debias.runtime.checkpoint import atomic_write_text

__all__ = ["AuditReport", "GroupFinding", "RowsFinding", "Thumb", "write_report", "render_html", "image_grid", "figure_to_data_uri"]


@dataclass
class AuditReport:
    """Everything the HTML report shows; built by the audit, rendered by `write_report`."""

    title: str
    summary: dict[str, object]  # key/value table at the top (counts, skipped files, ESS, model info)
    scores: pd.DataFrame  # one row per sample: "path", metadata columns, "rarity", "weight", "recon_error"
    latent_hist: list[tuple[np.ndarray, np.ndarray]]  # per density dim: (counts, bin_edges) as np.histogram returns
    dim_labels: list[str]  # same length as latent_hist, e.g. "z3 (KL 1.2)"
    rarest: np.ndarray  # (k, H, W, C) uint8, C in {1, 3}
    rarest_captions: list[str]
    typical: np.ndarray  # (k, H, W, C) uint8
    typical_captions: list[str]
    recon_originals: np.ndarray  # (m, H, W, C) uint8
    recon_outputs: np.ndarray  # (m, H, W, C) uint8, reconstructions of the above
    traversals: np.ndarray  # (d, s, H, W, C) uint8: d latent dims, s steps each, one dim perturbed at a time
    traversal_labels: list[str]  # d labels, e.g. "z3"
    traversal_values: list[float]  # s values of the perturbed coordinate, e.g. -3..3
    prior_samples: np.ndarray  # (p, H, W, C) uint8: decoded z ~ N(0, I)
    # per --group-by column (or "a x b" for a cross product): index = group value; columns "count",
    # "share", "mean_rarity", "mean_weight", "weight_share", "weight_ratio"
    group_tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    rarity_auroc: dict[str, float] = field(default_factory=dict)  # "group name" -> AUROC of rarity for that group
    finding_groups: list["GroupFinding"] = field(default_factory=list)  # the report's first section
    finding_rows: "RowsFinding | None" = None


@dataclass
class Thumb:
    uri: str  # data:image/png;base64,...
    caption: str  # its group or label, and its path


@dataclass
class GroupFinding:
    """An under-represented group: fewer rows than an even split, and what the audit's weights give it."""

    grouping: str
    group: str
    count: int
    share: float
    even_share: float
    weight_share: float
    ratio: float
    auroc: float | None
    examples: list[Thumb]


@dataclass
class RowsFinding:
    """The rarest rows, why they are rare, and the latent factor that sets them apart (a traversal of it)."""

    estimator: str
    n_rows: int
    n_shown: int
    examples: list[Thumb]
    by_reconstruction: int | None  # of the shown rows, how many are rare mainly by reconstruction error
    dim_label: str
    dim_shift: float
    traversal: list[str]  # data URIs
    traversal_values: list[str]
    by_embedding: int | None = None  # ... and mainly by the contrastive encoder's features (None: no encoder term)


# One environment for the audit report and the quality page. Autoescaping is what keeps data out of the markup:
# a template that needs a value unescaped says so with `|safe`, and only for our own constants.
TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("debias.reports", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)
_MACROS = TEMPLATES.get_template("report_macros.html").module  # its macros, callable from Python

Section = dict[str, Any]  # the plain data of one section of a template; None where the section is omitted


def _finding_section(report: AuditReport) -> Section | None:
    if not report.finding_groups and report.finding_rows is None:
        return None
    return {"groups": report.finding_groups, "has_groupings": bool(report.group_tables), "rows": report.finding_rows}


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------

_PLOT_DPI = 100
# Target on-screen size of one sample image; small images (32x32, 64x64) are upscaled towards it.
_TARGET_IMAGE_PX = 96
_MAX_BARS = 40  # more groups than this make an unreadable bar chart; the table still lists all
_MAX_SEQ_ITEMS = 10  # long lists in the summary (e.g. skipped files) are abbreviated
_TOP_ROWS = 20  # rows of the "rarest samples" score table
_CONTENT_PX = 1130  # usable page width: main is 1200 px minus 2 x 28 px padding, with some slack


def _mpl_text(value: object, max_len: int = 40) -> str:
    """Make user text safe for matplotlib: "$" would start mathtext; very long labels wreck layout."""
    text = str(value).replace("\n", " ")
    if len(text) > max_len:
        text = text[: max_len - 1] + "…"
    return text.replace("$", r"\$")


def format_value(value: object) -> str:
    """Human-readable, unescaped formatting of a scalar, used for summary values and table cells."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v == int(v) and abs(v) < 1e15:
            return f"{int(v):,}"
        return f"{v:.4g}"
    return str(value)


def summary_value(value: object) -> dict[str, object]:
    """One summary value as data for the `summary_value` macro: {"kind": "text", "text"} for a scalar; for a list,
    set, mapping or 1-d array its items formatted, the first `_MAX_SEQ_ITEMS` in "shown" and the others (skipped
    files can be thousands) in "rest", with "total" and "more" as counts."""
    if isinstance(value, Mapping):
        items = [f"{format_value(k)}: {format_value(v)}" for k, v in value.items()]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = [format_value(v) for v in (sorted(value, key=str) if isinstance(value, (set, frozenset)) else value)]
    elif isinstance(value, np.ndarray) and value.ndim == 1:
        items = [format_value(v) for v in value.tolist()]
    else:
        return {"kind": "text", "text": format_value(value)}
    return {"kind": "list", "shown": items[:_MAX_SEQ_ITEMS], "rest": items[_MAX_SEQ_ITEMS:],
            "total": f"{len(items):,}", "more": f"{max(0, len(items) - _MAX_SEQ_ITEMS):,}"}


def summary_rows(summary: Mapping[str, object] | None) -> list[tuple[str, dict[str, object]]]:
    """A key/value summary as rows for the `kv_table` macro."""
    return [(str(k), summary_value(v)) for k, v in (summary or {}).items()]


def format_summary_value(value: object) -> str:
    """HTML for one summary value (long lists, e.g. skipped files, abbreviated), rendered by the template macro."""
    return str(_MACROS.summary_value(summary_value(value)))


def _group_key_text(key: object) -> str:
    """Index value of a group table as text; tuples come from cross products (MultiIndex)."""
    if isinstance(key, tuple):
        return " × ".join(_group_key_text(k) for k in key)
    if key is None or (isinstance(key, float) and math.isnan(key)) or key is pd.NA or key is pd.NaT:
        return "(missing)"
    return str(key)


def _pad_labels(labels: Sequence[object] | None, n: int, default: str) -> list[str]:
    """Exactly n labels: a length mismatch upstream should cost a label, not the whole report."""
    out = [str(x) for x in (labels or [])][:n]
    out += [default.format(i) for i in range(len(out), n)]
    return out


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def _as_image_batch(images: np.ndarray, ndim: int = 4) -> np.ndarray:
    """Validate a batch of uint8 images; a missing channel axis is read as greyscale."""
    arr = np.asarray(images)
    if arr.size == 0:
        return arr.reshape((0,) * ndim) if arr.ndim != ndim else arr
    if arr.ndim == ndim - 1:
        arr = arr[..., None]
    if arr.ndim != ndim:
        raise ValueError(f"expected a {ndim}-d image array (..., H, W, C), got shape {arr.shape}")
    if arr.dtype != np.uint8:
        # Refuse rather than guess between [0, 1] and [0, 255] floats: a wrong guess gives a
        # black or saturated report that looks like a model problem.
        raise ValueError(f"images must be uint8, got {arr.dtype}")
    if arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must have 1, 3 or 4 channels, got {arr.shape[-1]}")
    return arr


def _auto_scale(height: int) -> int:
    """Nearest-neighbour factor that brings a small image to about _TARGET_IMAGE_PX."""
    return max(1, round(_TARGET_IMAGE_PX / max(1, height)))


def _fit_cols(n: int, width_px: int, reserve_px: int = 0, max_cols: int = 8) -> int:
    """Images per row: as many as fit the page (8 x 128 px plus a label column would overflow it),
    then balanced so 12 images make rows of 6 + 6 rather than a ragged 7 + 5."""
    fit = max(1, min(max_cols, (_CONTENT_PX - reserve_px) // (width_px + 12)))
    rows = math.ceil(n / fit) if n else 1
    return max(1, math.ceil(n / rows)) if n else fit


def png_data_uri(image: np.ndarray, scale: int = 1) -> str:
    """One (H, W, C) uint8 image -> PNG data URI, upscaled by an integer factor (nearest neighbour)."""
    img = np.asarray(image)
    if scale > 1:
        # np.repeat is exact nearest-neighbour: no blur, pixels stay pixels.
        img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]  # mode "L": shown as grey, not as a false-colour map
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _px_image(image: np.ndarray, scale: int, alt: str = "") -> dict[str, object]:
    """One sample image as data for the `px_img` macro: its data URI, upscaled size and alt text."""
    h, w = image.shape[:2]
    return {"uri": png_data_uri(image, scale), "width": w * scale, "height": h * scale, "alt": alt}


def image_grid_data(
    images: np.ndarray, ncols: int, captions: list[str] | None = None, scale: int = 2
) -> dict[str, object] | None:
    """A grid of images (uint8 (n, H, W, C)) with optional captions as data for the `image_grid` macro; None for an
    empty batch. Images are upscaled by `scale` with nearest neighbour so 32x32 samples are visible."""
    arr = _as_image_batch(images)
    n = arr.shape[0]
    if n == 0:
        return None
    scale = max(1, int(scale))
    ncols = max(1, min(int(ncols), n))
    caps = _pad_labels(captions, n, "") if captions is not None else None
    cell_w = arr.shape[2] * scale
    # Captions may be wider than a tiny image; give each cell a minimum width and let text wrap.
    min_w = max(cell_w, 110) if caps is not None else cell_w
    cells = []
    for i in range(n):
        cap = caps[i] if caps is not None else ""
        cells.append({"img": _px_image(arr[i], scale, cap), "caption": cap})
    return {"ncols": ncols, "caption_px": min_w, "cells": cells}


def image_grid(
    images: np.ndarray, ncols: int, captions: list[str] | None = None, scale: int = 2
) -> str:
    """HTML snippet: a grid of base64 PNG <img> (uint8 (n, H, W, C), C in {1, 3}) with optional captions.

    Images are upscaled by `scale` with nearest neighbour so 32x32 samples are visible; captions
    are escaped by the template. Returns "" for an empty batch. Needs the report's CSS only for
    spacing, so other reports can embed it as is.
    """
    grid = image_grid_data(images, ncols, captions, scale)
    return "" if grid is None else str(_MACROS.image_grid(grid))


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


def figure_to_data_uri(fig) -> str:
    """Matplotlib figure -> "data:image/png;base64,...".

    Does not close the figure (the caller owns it; figures built with `Figure()` are freed by
    garbage collection, pyplot figures need `plt.close(fig)`). The PNG "Software" tag, which
    carries a URL, is dropped so the report holds no external address even in binary form.
    """
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_PLOT_DPI, metadata={"Software": None}, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot(fig: Figure, alt: str) -> dict[str, str]:
    """A figure as data for the `plot_img` macro."""
    uri = figure_to_data_uri(fig)
    fig.clear()  # drop artists now rather than waiting for the collector; the figures can be big
    return {"uri": uri, "alt": alt}


def _finite(values: Iterable[object]) -> np.ndarray:
    """Numeric, finite values only: a NaN score (failed sample) must not break a histogram."""
    arr = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(dtype=float)
    return arr[np.isfinite(arr)]


def _ess_from_summary(summary: Mapping[str, object]) -> float | None:
    """The audit's own ESS if it put one in the summary (key names vary: "ESS", "effective_sample_size", ...).

    Only absolute sizes match: "effective_sample_fraction" sits next to the size in the audit's summary.
    """
    for key, value in summary.items():
        k = str(key).lower().replace("_", " ").strip()
        if k in ("ess", "n eff", "neff") or "effective sample size" in k:
            try:
                v = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                return v
    return None


def _distribution_section(report: AuditReport) -> Section | None:
    scores = report.scores if report.scores is not None else pd.DataFrame()
    rarity = _finite(scores["rarity"]) if "rarity" in scores else np.array([])
    weights = _finite(scores["weight"]) if "weight" in scores else np.array([])
    weights = weights[weights >= 0]
    if rarity.size == 0 and (weights.size == 0 or weights.sum() <= 0):
        return None

    panels = int(rarity.size > 0) + (2 if weights.size and weights.sum() > 0 else 0)
    fig = Figure(figsize=(4.0 * panels, 3.3), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ai = 0
    weight_note: dict[str, str] | None = None

    if rarity.size:
        ax = axes[ai]
        ai += 1
        bins = min(60, max(10, int(np.sqrt(rarity.size))))
        ax.hist(rarity, bins=bins, color="#4c72b0", edgecolor="white", linewidth=0.3)
        k = int(np.asarray(report.rarest).shape[0]) if np.asarray(report.rarest).ndim >= 1 else 0
        if 0 < k < rarity.size:
            # Where the "rarest samples" grid below starts, so the grid can be read against the tail.
            cut = float(np.sort(rarity)[-k])
            ax.axvline(cut, color="#c44e52", linestyle="--", linewidth=1)
            ax.text(cut, ax.get_ylim()[1] * 0.95, f" rarest {k}", color="#c44e52", va="top", fontsize=8)
        ax.set_xlabel("rarity (−log density, higher = rarer)")
        ax.set_ylabel("samples")
        ax.set_title("Rarity")

    if weights.size and weights.sum() > 0:
        n = weights.size
        rel = np.sort(weights)[::-1] / weights.mean()  # 1.0 = the weight uniform sampling would give
        ax = axes[ai]
        ai += 1
        ax.plot(np.arange(1, n + 1) / n, rel, color="#4c72b0")
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="uniform")
        if rel.min() > 0 and rel.max() / rel.min() > 30:
            # Log only when weights span decades; over a narrow range it just adds minor-tick clutter.
            ax.set_yscale("log")
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("fraction of samples (sorted by weight)")
        ax.set_ylabel("weight / uniform weight")
        ax.set_title("Sorted weights")
        ax.legend(fontsize=8)

        # Lorenz curve: the further below the diagonal, the more the weight is concentrated.
        share = np.concatenate([[0.0], np.cumsum(np.sort(weights)) / weights.sum()])
        frac = np.linspace(0.0, 1.0, n + 1)
        gini = 1.0 - 2.0 * np.trapezoid(share, frac)
        ax = axes[ai]
        ax.plot(frac, share, color="#4c72b0", label=f"weights (Gini {gini:.2f})")
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="uniform")
        ax.set_xlabel("fraction of samples (lightest first)")
        ax.set_ylabel("cumulative share of weight")
        ax.set_title("Lorenz curve of weights")
        ax.set_aspect("equal")
        ax.legend(fontsize=8, loc="upper left")

        ess = _ess_from_summary(report.summary or {})
        source = "from the audit"
        if ess is None:
            ess = float(weights.sum() ** 2 / np.sum(weights**2))  # Kish effective sample size
            source = "computed from the weights"
        top = max(1, int(math.ceil(0.1 * n)))
        top_share = float(np.sort(weights)[::-1][:top].sum() / weights.sum())
        weight_note = {"ess": format_value(round(ess, 1)), "n": f"{n:,}", "fraction": f"{ess / n:.1%}",
                       "source": source, "heaviest": f"{rel[0]:.3g}", "top_share": f"{top_share:.1%}"}

    return {"weights": weight_note, "plot": _plot(fig, "rarity and weight distributions")}


def _latent_hist_section(report: AuditReport) -> Section | None:
    hists = list(report.latent_hist or [])
    if not hists:
        return None
    labels = _pad_labels(report.dim_labels, len(hists), "dim {}")
    ncols = min(6, len(hists))
    nrows = math.ceil(len(hists) / ncols)
    fig = Figure(figsize=(2.1 * ncols, 1.6 * nrows + 0.2), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        if i >= len(hists):
            ax.set_visible(False)
            continue
        counts, edges = (np.asarray(a, dtype=float) for a in hists[i])
        if counts.size and edges.size == counts.size + 1:
            ax.stairs(counts, edges, fill=True, color="#4c72b0", alpha=0.85)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(_mpl_text(labels[i], 28), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.locator_params(axis="x", nbins=4)  # long tick labels like -0.0175 collide in small panels
        ax.set_yticks([])  # counts are only compared by shape; the axis would just add clutter
    return {"plot": _plot(fig, "latent histograms")}


# --------------------------------------------------------------------------------------------
# Group section
# --------------------------------------------------------------------------------------------


def _fmt_group_cell(col: str, value: object) -> str:
    """Column-aware number formatting: shares as %, tiny mean weights in scientific notation."""
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return format_value(value)
    if math.isnan(v):
        return "n/a"
    if col == "count":
        return f"{int(round(v)):,}"
    if col in ("share", "weight_share"):
        return f"{v:.1%}"
    if col == "mean_weight":
        return f"{v:.3e}"
    if col in ("mean_rarity", "rarity_auroc"):
        return f"{v:.3f}"
    if col == "weight_ratio":
        return f"{v:.2f}×"
    return format_value(value)


def _group_table(name: str, df: pd.DataFrame, overall_mean: float | None) -> dict[str, object]:
    """One group table (and its chart) as data for the groups section of the template."""
    if df.empty:
        return {"name": name, "empty": True}
    # A cross product arrives as a MultiIndex: name the header after all its levels.
    index_name = " × ".join(str(n) for n in df.index.names if n is not None) or "group"
    rows = []
    for key, row in df.iterrows():
        ratio = row.get("weight_ratio", np.nan)
        try:
            ratio = float(ratio)
        except (TypeError, ValueError):
            ratio = np.nan
        # Mark strongly up-/down-weighted groups: those are the under-/over-represented ones.
        cls = "up" if ratio >= 1.5 else ("down" if ratio <= 1 / 1.5 else None)
        cells = [_fmt_group_cell(str(c), row[c]) for c in df.columns]
        rows.append({"cls": cls, "key": _group_key_text(key), "cells": cells})
    return {"name": name, "empty": False, "index_name": index_name, "columns": [str(c) for c in df.columns],
            "rows": rows, "chart": _group_chart(name, df, overall_mean)}


def _group_chart(name: str, df: pd.DataFrame, overall_mean: float | None) -> dict[str, object] | None:
    if "mean_weight" not in df.columns or df.empty:
        return None
    data = df.copy()
    truncated = None
    if len(data) > _MAX_BARS:
        # Keep the largest groups: they are the ones a reader can act on.
        order = data["count"] if "count" in data.columns else data["mean_weight"]
        data = data.loc[pd.to_numeric(order, errors="coerce").fillna(0).sort_values(ascending=False).index[:_MAX_BARS]]
        truncated = {"shown": _MAX_BARS, "total": f"{len(df):,}"}
    labels = [_mpl_text(_group_key_text(k), 30) for k in data.index]
    mean_w = pd.to_numeric(data["mean_weight"], errors="coerce").to_numpy(dtype=float)
    if overall_mean is None and "count" in data.columns:
        counts = pd.to_numeric(df["count"], errors="coerce").to_numpy(dtype=float)
        mw = pd.to_numeric(df["mean_weight"], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(counts) & np.isfinite(mw)
        overall_mean = float((counts[ok] * mw[ok]).sum() / counts[ok].sum()) if counts[ok].sum() > 0 else None
    has_shares = "share" in data.columns and "weight_share" in data.columns

    y = np.arange(len(data))
    ncols = 2 if has_shares else 1
    fig = Figure(figsize=(5.2 * ncols, max(2.2, 0.28 * len(data) + 1.1)), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False, sharey=True)[0]

    # Legends go above the axes: inside, every corner is some group's bar.
    legend_kw = dict(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=3, frameon=False)
    up, down = "#c44e52", "#4c72b0"
    ax = axes[0]
    has_ref = overall_mean is not None and math.isfinite(overall_mean)
    colors = [up if (has_ref and m > overall_mean) else down for m in np.nan_to_num(mean_w)]
    ax.barh(y, np.nan_to_num(mean_w), color=colors)
    handles: list[object] = [Patch(color=down, label="below mean")]
    if has_ref:
        ax.axvline(overall_mean, color="black", linestyle="--", linewidth=1)
        handles = [Patch(color=up, label="above mean"), *handles,
                   Line2D([], [], color="black", linestyle="--", linewidth=1, label="overall mean")]
    ax.legend(handles=handles, **legend_kw)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()  # first table row on top, like the table
    ax.set_xlabel("mean weight per sample")
    ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 3))
    ax.set_title("Mean weight per group", fontsize=10, pad=22)

    if has_shares:
        ax = axes[1]
        share = pd.to_numeric(data["share"], errors="coerce").fillna(0).to_numpy(dtype=float)
        wshare = pd.to_numeric(data["weight_share"], errors="coerce").fillna(0).to_numpy(dtype=float)
        h = 0.4
        ax.barh(y - h / 2, share, height=h, color="#8c8c8c", label="share of data")
        ax.barh(y + h / 2, wshare, height=h, color="#dd8452", label="share of weight")
        ax.xaxis.set_major_formatter(lambda v, _pos: f"{v:.0%}")
        ax.set_xlabel("fraction")
        ax.set_title("Share of data vs share of weight", fontsize=10, pad=22)
        ax.legend(**legend_kw)
    return {"truncated": truncated, "plot": _plot(fig, f"weights per group of {name}")}


def _group_section(report: AuditReport) -> Section | None:
    tables = {k: v for k, v in (report.group_tables or {}).items() if v is not None}
    auroc = dict(report.rarity_auroc or {})
    if not tables and not auroc:
        return None
    overall_mean: float | None = None
    if report.scores is not None and "weight" in report.scores:
        w = _finite(report.scores["weight"])
        overall_mean = float(w.mean()) if w.size else None

    return {
        "tables": [_group_table(str(name), df, overall_mean) for name, df in tables.items()],
        "auroc": [(str(k), _fmt_auroc(v)) for k, v in auroc.items()],
    }


def _fmt_auroc(v: object) -> str:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if math.isnan(f) else f"{f:.3f}"


# --------------------------------------------------------------------------------------------
# Image sections
# --------------------------------------------------------------------------------------------


def _grid_section(images: np.ndarray, captions: list[str] | None) -> Section | None:
    """A section that is one grid of sample images (rarest, typical, prior), sized to fit the page."""
    arr = _as_image_batch(images)
    if arr.shape[0] == 0:
        return None
    scale = _auto_scale(arr.shape[1])
    ncols = _fit_cols(arr.shape[0], max(arr.shape[2] * scale, 110 if captions else 0))
    return {"grid": image_grid_data(arr, ncols=ncols, captions=captions, scale=scale)}


def _rarest_table(scores: pd.DataFrame | None) -> dict[str, object] | None:
    """The top rows by rarity as text: paths and metadata the reader can look up."""
    if scores is None or scores.empty or "rarity" not in scores:
        return None
    top = scores.assign(_r=pd.to_numeric(scores["rarity"], errors="coerce")).nlargest(_TOP_ROWS, "_r").drop(columns="_r")
    numeric = {c for c in top.columns if pd.api.types.is_numeric_dtype(top[c])}
    rows = [
        [{"num": c in numeric, "text": _fmt_score_cell(str(c), v)} for c, v in row.items()]
        for _, row in top.iterrows()
    ]
    return {"n": len(top), "columns": [str(c) for c in top.columns], "rows": rows}


def _fmt_score_cell(col: str, value: object) -> str:
    if isinstance(value, (float, np.floating)) and math.isfinite(value):
        if col == "weight":
            return f"{float(value):.3e}"  # weights are ~1/n: fixed-point would print 0.0001
        if col == "rarity":
            return f"{float(value):.3f}"  # fixed decimals so the sorted column reads evenly
    return format_value(value)


def _recon_section(report: AuditReport) -> Section | None:
    orig = _as_image_batch(report.recon_originals)
    rec = _as_image_batch(report.recon_outputs)
    m = min(orig.shape[0], rec.shape[0])
    if m == 0:
        return None
    scale = _auto_scale(orig.shape[1])
    per_row = _fit_cols(m, orig.shape[2] * scale, reserve_px=130)  # 130: the "reconstruction" label
    # Chunks of pairs that fit the page, each shown as two table rows (originals above reconstructions).
    blocks = [
        {
            "originals": [_px_image(orig[i], scale, f"original {i}") for i in range(start, min(m, start + per_row))],
            "reconstructions": [
                _px_image(rec[i], scale, f"reconstruction {i}") for i in range(start, min(m, start + per_row))
            ],
        }
        for start in range(0, m, per_row)
    ]
    mismatch = None
    if orig.shape[0] != rec.shape[0]:
        mismatch = {"originals": orig.shape[0], "reconstructions": rec.shape[0], "pairs": m}
    return {"blocks": blocks, "mismatch": mismatch}


def _traversal_section(report: AuditReport) -> Section | None:
    trav = _as_image_batch(report.traversals, ndim=5)
    if trav.shape[0] == 0 or trav.shape[1] == 0:
        return None
    d, s = trav.shape[:2]
    labels = _pad_labels(report.traversal_labels, d, "dim {}")
    values = list(report.traversal_values or [])
    columns = [_fmt_value(values[j]) if j < len(values) else f"step {j}" for j in range(s)]
    scale = _auto_scale(trav.shape[2])
    rows = [
        {"label": labels[i], "images": [_px_image(trav[i, j], scale, f"{labels[i]} step {j}") for j in range(s)]}
        for i in range(d)
    ]
    return {"columns": columns, "rows": rows}


def _fmt_value(v: object) -> str:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(v)
    return f"{f:+.3g}" if f != 0 else "0"


# --------------------------------------------------------------------------------------------
# Page
# --------------------------------------------------------------------------------------------

PAGE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
       color: #222; background: #fafafa; margin: 0; line-height: 1.45; }
main { max-width: 1200px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 2em; }
h3 { font-size: 1.05em; margin: 1.4em 0 0.5em; }
nav { font-size: 0.9em; margin-bottom: 1em; }
nav a { margin-right: 1em; color: #3060a0; text-decoration: none; }
.muted { color: #666; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.9em; }
table.kv th { text-align: left; font-weight: 600; padding: 3px 18px 3px 0; vertical-align: top; white-space: nowrap; }
table.kv td { padding: 3px 0; overflow-wrap: anywhere; }
table.data th, table.data td { border-bottom: 1px solid #eee; padding: 3px 10px; text-align: left; }
table.data thead th { background: #f3f3f3; position: sticky; top: 0; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.data td { overflow-wrap: anywhere; max-width: 420px; }
tr.up, span.up { background: #fde2e1; }
tr.down, span.down { background: #e4ecf7; }
.scroll { max-height: 460px; overflow: auto; margin-bottom: 12px; display: inline-block; max-width: 100%; }
.scroll-x { overflow-x: auto; }
table.imgtab { margin-bottom: 12px; }
table.imgtab th { font-weight: 600; font-size: 0.85em; padding: 2px 8px; text-align: right; white-space: nowrap; }
table.imgtab thead th { text-align: center; }
table.imgtab td { padding: 1px; }
figure.cell { margin: 0; }
.finding-grid { display: flex; flex-wrap: wrap; gap: 8px 10px; margin: 6px 0 14px; }
.finding-grid figure { margin: 0; width: 112px; }
.finding-grid img { width: 96px; height: 96px; image-rendering: pixelated; display: block; }
.finding-grid figcaption { font-size: 0.72em; color: #555; overflow-wrap: anywhere; }
.finding { border-left: 3px solid #c0392b; padding-left: 10px; margin: 10px 0; }
figcaption { font-size: 0.75em; color: #444; overflow-wrap: anywhere; line-height: 1.25; margin-top: 2px; }
img.px { image-rendering: pixelated; display: block; border: 1px solid #ddd; }
img.plot { max-width: 100%; height: auto; display: block; margin: 8px 0; }
details { margin: 10px 0; }
summary { cursor: pointer; color: #3060a0; }
"""

# Belt and braces for self-containment: even if some value slipped through unescaped, the browser
# would refuse to load anything but inline data: images and the inline stylesheet.
PAGE_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _summary_section(summary: Mapping[str, object] | None) -> list[tuple[str, dict[str, object]]] | None:
    return summary_rows(summary) if summary else None


_SECTION_TITLES = {
    "summary": "Run details",
    "distributions": "Distributions",
    "rarest": "Rarest",
    "typical": "Typical",
    "reconstructions": "Reconstructions",
    "traversals": "Traversals",
    "prior": "Prior samples",
    "latent-histograms": "Latent histograms",
    "groups": "Groups",
    "finding": "What the audit found",
}


def render_html(report: AuditReport) -> str:
    """The whole report as one HTML string (what `write_report` writes), from templates/audit_report.html."""
    rarest = _grid_section(report.rarest, report.rarest_captions)
    if rarest is not None:
        rarest["table"] = _rarest_table(report.scores)
    sections = {  # the answer first; the internals (the summary: fingerprint, density settings, speeds) last
        "finding": _finding_section(report),
        "distributions": _distribution_section(report),
        "rarest": rarest,
        "typical": _grid_section(report.typical, report.typical_captions),
        "reconstructions": _recon_section(report),
        "traversals": _traversal_section(report),
        "prior": _grid_section(report.prior_samples, None),
        "latent-histograms": _latent_hist_section(report),
        "groups": _group_section(report),
        "summary": _summary_section(report.summary),
    }
    nav = [(sid, _SECTION_TITLES[sid]) for sid, body in sections.items() if body]
    context = {sid.replace("-", "_"): body for sid, body in sections.items()}
    context["groups_section"] = context.pop("groups")  # "groups" names the finding template's groups
    page = TEMPLATES.get_template("audit_report.html").render(
        title=str(report.title), csp=PAGE_CSP, css=PAGE_CSS, nav=nav, **context
    )
    return page + "\n"


def write_report(report: AuditReport, path: str | Path) -> Path:
    """Write `report` as one self-contained HTML file (parents created) and return its path."""
    out = Path(path)
    atomic_write_text(render_html(report), out)  # a crash never leaves half a report behind
    return out
