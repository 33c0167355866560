"""Classifier metrics overall and per group: accuracy, AUROC, worst-group accuracy and the spread across groups.

The bias measure of Amini et al. (AIES 2019, Table 1) is the variance of the accuracies across demographic groups; it
is computed here as the population variance (ddof=0) of the per-group accuracies, accuracies as fractions in [0, 1].
Groups are only ever read here, after training: nothing in this module feeds back into a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

CROSS = " x "  # joins column names and values of a cross-product grouping, e.g. "race x gender" / "black x female"


def auroc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """Binary: AUROC of the second class's probability. Multi-class: macro one-vs-rest over the classes present.
    None when the evaluated rows hold a single class (undefined)."""
    y = np.asarray(y)
    present = np.unique(y)
    if len(present) < 2:
        return None
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    scores = [roc_auc_score(y == k, probs[:, k]) for k in present]
    return float(np.mean(scores))


def group_key(table: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """One string per row naming its group; several columns are crossed ("black x female")."""
    parts = [table[c].astype(str) for c in columns]
    key = parts[0]
    for p in parts[1:]:
        key = key + CROSS + p
    return key


def group_accuracy(correct: np.ndarray, key: pd.Series) -> pd.DataFrame:
    """Per group: n and accuracy, sorted by group name."""
    df = pd.DataFrame({"group": key.to_numpy(), "correct": np.asarray(correct, dtype=np.float64)})
    out = df.groupby("group", sort=True)["correct"].agg(n="size", accuracy="mean")
    out["n"] = out["n"].astype(int)
    return out


def grouping_summary(acc: pd.DataFrame) -> dict[str, Any]:
    """Worst-group accuracy, the gap between the best and the worst group and the variance of the accuracies."""
    a = acc["accuracy"].to_numpy()
    return {
        "groups": {str(g): {"n": int(r.n), "accuracy": float(r.accuracy)} for g, r in acc.iterrows()},
        "worst_group": str(acc["accuracy"].idxmin()),
        "worst_group_accuracy": float(a.min()),
        "best_group_accuracy": float(a.max()),
        "accuracy_gap": float(a.max() - a.min()),
        "accuracy_variance": float(np.var(a)),  # paper Table 1: variance of the group accuracies
        "mean_group_accuracy": float(a.mean()),
    }


def classification_metrics(
    table: pd.DataFrame, y: np.ndarray, probs: np.ndarray, group_columns: Sequence[str] = ()
) -> dict[str, Any]:
    """Overall accuracy and AUROC, and for each group column and (with two or more) their cross product the
    per-group accuracies and their summary. ``worst_group_accuracy`` at the top level is the finest grouping's
    (the cross product when there are several columns)."""
    y = np.asarray(y)
    pred = probs.argmax(1)
    correct = pred == y
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float(correct.mean()) if len(y) else None,
        "auroc": auroc(y, probs),
        "groupings": {},
    }
    groupings: list[list[str]] = [[c] for c in group_columns]
    if len(group_columns) > 1:
        groupings.append(list(group_columns))
    for cols in groupings:
        acc = group_accuracy(correct, group_key(table, cols))
        out["groupings"][CROSS.join(cols)] = grouping_summary(acc)
    if groupings:
        finest = out["groupings"][CROSS.join(groupings[-1])]
        out["worst_group_accuracy"] = finest["worst_group_accuracy"]
        out["group_accuracy_variance"] = finest["accuracy_variance"]
    return out
