"""`report.html` of a `train-classifier` run: what the debiaser did, on one self-contained page.

It shows the accuracy per evaluation group, the effective sample size of the sampling weights over the epochs, the
training images each class upweighted most, and each group's share of the draws against its share of the data. The
group figures are computed after training from the group columns, for display only. The page is rendered from a
Jinja2 template with autoescaping, so no value from the data can become markup.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from debias.evaluation.classifier_metrics import CROSS, group_key
from debias.reports.audit import PAGE_CSP, PAGE_CSS, figure_to_data_uri, png_data_uri
from debias.runtime.checkpoint import atomic_write_text

TOP_K = 32
_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("debias.reports", "templates"),
    autoescape=jinja2.select_autoescape(["html"]),
    undefined=jinja2.StrictUndefined,
)

METHOD_BLURBS = {
    "none": "Plain training (ERM): every training row once per epoch.",
    "dbvae": "DB-VAE (Amini et al. 2019, Algorithm 1): each epoch draws rows in inverse proportion to their density "
    "in the jointly trained latent space.",
    "two-stage": "Fixed weights from an earlier audit.",
    "jtt": "Just Train Twice (Liu et al. 2021): the rows a first model got wrong are drawn more often.",
    "rarity": "Inverse density within each class in the feature space of a first, bias-amplified (GCE) model that sees "
    "5 px at a time, with a "
    "neighbourhood of 5 % of the class's rows: rows that are rare for their class are drawn more often. No error "
    "signal.",
    "cluster-errors": "Each class's rows are clustered in a first model's features; a cluster is drawn more often "
    "the more of its rows the first model got wrong, in proportion to its error rate (half of each class's draws stay "
    "as in the data).",
    "lff": "Learning from Failure (Nam et al. 2020): every epoch, the rows a bias-amplified first model fails and the "
    "model being trained gets right are drawn more often (relative difficulty; half of each class's draws stay "
    "uniform). The first model sees 5 px at a time: it can learn a colour, texture or blur shortcut, not the task.",
    "oracle": "Reference, not a method: group-balanced sampling that reads the group columns.",
}


def auto_choice(first_model: dict[str, Any]) -> str:
    """Which method ``auto`` chose and why, in one sentence (the run's print and its report)."""
    ess, gate = first_model["first_epoch_ess"], first_model["gate"]
    if first_model["chose"] == "lff":
        why = (f"the bias-amplified first model's losses concentrate on few rows (ESS of its weights {ess:.2f} n, "
               f"at most the gate {gate:g} n): a shortcut is likely")
    else:
        why = (f"the bias-amplified first model's losses are spread (ESS of its weights {ess:.2f} n, above the gate "
               f"{gate:g} n): no shortcut seen, so it trains plainly")
    return f"auto chose {first_model['chose']}: {why}."


def method_blurb(metrics: dict[str, Any]) -> str:
    """One sentence on what the method did; for ``auto``, which method it chose and why."""
    first = metrics.get("first_model") or {}
    if metrics["method"] == "auto" and "chose" in first:
        return auto_choice(first) + " " + METHOD_BLURBS[first["chose"]]
    return METHOD_BLURBS.get(metrics["method"], "")


def weight_shares(
    table: pd.DataFrame, weights: np.ndarray, columns: Sequence[str]
) -> dict[str, pd.DataFrame]:
    """For each grouping (each column, and their cross product when there are several): rows, share of the data,
    share of the draws (the sum of the sampling probabilities) and their ratio, sorted by ratio, largest first."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    groupings = [[c] for c in columns] + ([list(columns)] if len(columns) > 1 else [])
    out: dict[str, pd.DataFrame] = {}
    for cols in groupings:
        key = group_key(table, cols).to_numpy()
        df = pd.DataFrame({"group": key, "w": w})
        agg = df.groupby("group", sort=True)["w"].agg(n="size", draw_share="sum")
        agg["data_share"] = agg["n"] / len(df)
        agg["ratio"] = agg["draw_share"] / agg["data_share"]
        out[CROSS.join(cols)] = agg.sort_values("ratio", ascending=False)[["n", "data_share", "draw_share", "ratio"]]
    return out


def render_report(
    *,
    metrics: dict[str, Any],
    history: list[dict[str, Any]],
    weights: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    class_values: Sequence[Any],
    paths: Sequence[str],
    shares: dict[str, pd.DataFrame] | None = None,
    selection: str = "",
) -> str:
    """The page as a string. ``weights``: mean sampling probability of each training row over the epochs;
    ``images``: those rows' uint8 (n, H, W, C) pixels; ``labels``: their class indices."""
    n = len(weights)
    rel = np.asarray(weights, dtype=np.float64) * n  # 1 = as often as uniform sampling
    upweighted = []
    for k, value in enumerate(class_values):
        rows = np.flatnonzero(labels == k)
        top = rows[np.argsort(-rel[rows], kind="stable")[:TOP_K]]
        scale = max(1, 64 // max(1, images.shape[1]))
        upweighted.append(
            {
                "value": value,
                "images": [
                    {
                        "uri": png_data_uri(images[i], scale),
                        "size": images.shape[1] * scale,
                        "caption": f"{rel[i]:.1f}× {os.path.basename(str(paths[i]))}",
                    }
                    for i in top
                ],
            }
        )
    groups = []
    for name, g in (metrics.get("groupings") or {}).items():
        rows = [
            {"group": grp, "n": r["n"], "accuracy": r["accuracy"], "worst": grp == g["worst_group"]}
            for grp, r in g["groups"].items()
        ]
        groups.append({"name": name, "rows": rows})
    share_rows = [
        {"name": name, "rows": [{"group": grp, **r} for grp, r in df.to_dict("index").items()]}
        for name, df in (shares or {}).items()
    ]
    run = [
        ("label", metrics.get("label")),
        ("classes", ", ".join(map(str, class_values))),
        ("training rows", metrics.get("n_train")),
        ("validation rows", metrics.get("n_val")),
        ("evaluation rows", metrics.get("n_eval")),
        ("median epoch time", f"{np.median(metrics['epoch_s']):.2f} s" if metrics.get("epoch_s") else "–"),
        ("method options", metrics.get("config", {}).get("method_options")),
    ]
    return _ENV.get_template("classifier_report.html").render(
        title=f"debias train-classifier: {metrics['method']}",
        csp=PAGE_CSP,
        css=PAGE_CSS,
        method=metrics["method"],
        method_blurb=method_blurb(metrics),
        accuracy=metrics["accuracy"],
        worst=metrics.get("worst_group_accuracy"),
        worst_group=_worst_group(metrics),
        n_eval=metrics["n_eval"],
        eval_set=metrics["eval_set"],
        selected_epoch=metrics["selected_epoch"],
        epochs=len(history),
        selection=selection,
        groups=groups,
        group_plot=_group_plot(metrics) if groups else None,
        shares=share_rows,
        ess_plot=_ess_plot(history),
        top_k=TOP_K,
        label=metrics.get("label"),
        upweighted=upweighted,
        run=run,
    )


def write_report(path: str | Path, **kwargs: Any) -> Path:
    out = Path(path)
    atomic_write_text(render_report(**kwargs), out)
    return out


def _worst_group(metrics: dict[str, Any]) -> str:
    groupings = metrics.get("groupings") or {}
    if not groupings:
        return ""
    return str(groupings[list(groupings)[-1]]["worst_group"])


def _ess_plot(history: list[dict[str, Any]]) -> str:
    fig = Figure(figsize=(6, 2.6))
    ax = fig.add_subplot(1, 1, 1)
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h.get("ess_fraction", 1.0) for h in history], marker="o")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("epoch")
    ax.set_ylabel("ESS / n")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_to_data_uri(fig)


def _group_plot(metrics: dict[str, Any]) -> str:
    groupings = metrics["groupings"]
    name = list(groupings)[-1]
    groups = groupings[name]["groups"]
    fig = Figure(figsize=(max(5.0, 0.7 * len(groups) + 2), 3))
    ax = fig.add_subplot(1, 1, 1)
    keys = list(groups)
    ax.bar(range(len(keys)), [100 * groups[k]["accuracy"] for k in keys], color="#4c78a8")
    ax.set_xticks(range(len(keys)), keys, rotation=30 if len(keys) > 2 else 0, ha="right" if len(keys) > 2 else "center")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"accuracy per {name}")
    fig.tight_layout()
    return figure_to_data_uri(fig)
