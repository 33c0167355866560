"""An audit folder (written by `debias audit`) read for the `/audit` browser: summary, rows, thumbnails, histograms.

The folder is re-read when its files change, so an audit re-run into the same folder shows up without a restart.
Paging, sorting and filtering happen here (server side): a full audit can have millions of rows.
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from debias.service.errors import ApiError

Subset = Literal["rarest", "typical", "all"]
#: With an audit written before browser.json existed: how many rows count as "rarest" / "most typical".
_FALLBACK_K = 64


@dataclass(frozen=True)
class RowQuery:
    subset: Subset = "rarest"
    sort: str | None = None  # default: rarity, descending for "rarest" and "all", ascending for "typical"
    descending: bool | None = None
    q: str = ""  # case-insensitive substring, in ``column`` or in any column
    column: str | None = None
    offset: int = 0
    limit: int = 100


@dataclass
class AuditData:
    root: Path
    summary: dict[str, Any]
    scores: pd.DataFrame  # with a leading "row" column: the row's position in scores.parquet
    browser: dict[str, Any] | None  # browser.json, None for audits written before it existed

    @classmethod
    def load(cls, root: Path) -> "AuditData":
        if not (root / "scores.parquet").is_file():
            raise ApiError(404, "no_audit", f"no audit in {root} (scores.parquet is missing; run 'debias audit')")
        try:
            scores = pd.read_parquet(root / "scores.parquet")
            summary = json.loads((root / "summary.json").read_text()) if (root / "summary.json").is_file() else {}
            browser = json.loads((root / "browser.json").read_text()) if (root / "browser.json").is_file() else None
        except (OSError, ValueError) as exc:  # a torn or foreign file: one line, not a 500
            raise ApiError(404, "bad_audit", f"cannot read the audit in {root}: {str(exc).splitlines()[0]}") from None
        if "rarity" not in scores.columns:
            raise ApiError(404, "bad_audit", f"{root / 'scores.parquet'} has no rarity column; not an audit")
        scores.insert(0, "row", np.arange(len(scores)))
        if browser is not None and not _valid_browser(browser, len(scores)):
            browser = None  # foreign or torn: browse without thumbnails rather than fail
        return cls(root=root, summary=summary, scores=scores, browser=browser)

    @cached_property
    def _text(self) -> dict[str, pd.Series]:
        return {}

    def text_column(self, column: str) -> pd.Series:
        """A column as the strings the filter searches, converted once per loaded audit (not once per keystroke), and
        only for the columns actually searched (the whole table as strings would be gigabytes at a million rows)."""
        if column not in self._text:
            self._text[column] = self.scores[column].astype(str)
        return self._text[column]

    # -- what the page asks for --------------------------------------------------------------------------------
    def columns(self) -> list[dict[str, Any]]:
        return [{"name": c, "numeric": bool(pd.api.types.is_numeric_dtype(t))} for c, t in self.scores.dtypes.items()]

    def subset_rows(self, subset: Subset) -> np.ndarray:
        if subset == "all":
            return np.arange(len(self.scores))
        if self.browser is not None and self.browser.get("n_rows") == len(self.scores):
            return np.asarray(self.browser["thumbs"][subset], dtype=np.int64)
        order = np.argsort(-self.scores["rarity"].to_numpy(), kind="stable")
        return order[:_FALLBACK_K] if subset == "rarest" else order[::-1][:_FALLBACK_K]

    def thumb_rows(self) -> set[int]:
        if self.browser is None or self.browser.get("n_rows") != len(self.scores):
            return set()  # none, or written for another scores.parquet
        return set(self.browser["thumbs"]["rarest"]) | set(self.browser["thumbs"]["typical"])

    def thumb_path(self, row: int) -> Path | None:
        path = self.root / "thumbs" / f"{row}.png"
        return path if row in self.thumb_rows() and path.is_file() else None

    def rows(self, query: RowQuery, thumbs: bool = True) -> dict[str, Any]:
        """One page of rows: filtered, then sorted, then sliced; thumbnails inlined as data URLs."""
        df = self.scores.iloc[self.subset_rows(query.subset)]
        if query.column is not None and query.column not in df.columns:
            raise ApiError(400, "bad_column", f"unknown column {query.column!r} (columns: {', '.join(df.columns)})")
        if query.q:
            cols = [query.column] if query.column else list(df.columns)
            rows = df["row"].to_numpy()
            hit = np.zeros(len(df), dtype=bool)
            for c in cols:
                hit |= self.text_column(c).iloc[rows].str.contains(query.q, case=False, regex=False).to_numpy()
            df = df[hit]
        sort = query.sort or "rarity"
        if sort not in df.columns:
            raise ApiError(400, "bad_column", f"cannot sort by unknown column {sort!r}")
        descending = query.descending if query.descending is not None else query.subset != "typical"
        # stable, missing values last whichever the direction, ties keep the file order
        df = df.sort_values(sort, ascending=not descending, kind="stable", na_position="last")
        page = df.iloc[query.offset : query.offset + query.limit]
        records = json.loads(page.to_json(orient="records", double_precision=15))
        if thumbs:
            for rec in records:
                path = self.thumb_path(int(rec["row"]))
                rec["thumb"] = (
                    "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii") if path else None
                )
        return {
            "subset": query.subset, "sort": sort, "descending": descending, "total": len(df),
            "offset": query.offset, "limit": query.limit, "rows": records,
        }


class AuditStore:
    """The configured audit folder, loaded on first use and reloaded when one of its files changes."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._stamp: tuple[float, ...] | None = None
        self._data: AuditData | None = None

    def _stamp_now(self) -> tuple[float, ...]:
        assert self.root is not None
        names = ("scores.parquet", "summary.json", "browser.json")
        return tuple((self.root / n).stat().st_mtime_ns if (self.root / n).exists() else -1 for n in names)

    def get(self) -> AuditData:
        if self.root is None:
            raise ApiError(
                404, "no_audit", "no audit folder is configured: start the service with 'debias serve --audit DIR' "
                "(or DEBIAS_AUDIT_DIR), or run 'debias audit --open'",
            )
        with self._lock:
            stamp = self._stamp_now()
            if self._data is None or stamp != self._stamp:
                self._data, self._stamp = AuditData.load(self.root), stamp
            return self._data


def _valid_browser(browser: Any, n_rows: int) -> bool:
    """browser.json as `debias audit` writes it: thumbnail row lists of in-range integers."""
    try:
        thumbs = browser["thumbs"]
        return all(
            isinstance(r, int) and 0 <= r < n_rows for key in ("rarest", "typical") for r in thumbs[key]
        ) and isinstance(browser["n_rows"], int)
    except (KeyError, TypeError):
        return False
