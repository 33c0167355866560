"""The web pages and the JSON the audit browser reads.

    /            scoring page: drop images, see novelty, p-value, badge, unusual dimensions, heatmap; model card
    /audit       audit browser: rarest / most typical thumbnail table, per-group charts, latent histograms
    /static/...  the pages' own HTML, CSS and JS (no framework, no build step, nothing fetched from elsewhere)
    /v1/audit/*  summary, rows (paged, sorted, filtered server side), thumbnails, histograms

The pages themselves hold no data and need no key; everything under /v1 does when the server has one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from debias.service.audit_data import AuditData, AuditStore, RowQuery
from debias.service.deps import require_api_key
from debias.service.errors import ApiError, ErrorBody

STATIC_DIR = Path(__file__).parent / "static"

pages = APIRouter(include_in_schema=False)
audit_api = APIRouter(prefix="/v1/audit", dependencies=[Depends(require_api_key)], tags=["audit browser"])

_AUDIT_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key (when the server has a key)."},
    404: {"model": ErrorBody, "description": "No audit folder configured, or it holds no audit."},
}


def static_files() -> StaticFiles:
    return StaticFiles(directory=STATIC_DIR)


async def get_audit(request: Request) -> AuditData:
    store: AuditStore = request.app.state.audit_store
    return await run_in_threadpool(store.get)  # the first call reads the Parquet file


AuditDep = Annotated[AuditData, Depends(get_audit)]


# -- pages -------------------------------------------------------------------------------------------------------
@pages.get("/")
async def score_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html")


@pages.get("/audit")
async def audit_page(request: Request) -> Response:
    if request.app.state.audit_store.root is None:
        return HTMLResponse((STATIC_DIR / "no_audit.html").read_text(), status_code=404)
    return FileResponse(STATIC_DIR / "audit.html")


# -- JSON for the audit browser -----------------------------------------------------------------------------------
@audit_api.get("/summary", responses=_AUDIT_ERRORS)
async def audit_summary(audit: AuditDep) -> dict[str, Any]:
    """summary.json of the audit, its columns, and how many rows have thumbnails."""
    browser = audit.browser or {}
    return {
        "summary": audit.summary,
        "n_rows": len(audit.scores),
        "columns": audit.columns(),
        "k": len(audit.subset_rows("rarest")),
        "has_thumbs": bool(audit.thumb_rows()),
        "has_histograms": bool(browser.get("latent_histograms")),
    }


@audit_api.get("/rows", responses={**_AUDIT_ERRORS, 400: {"model": ErrorBody, "description": "Unknown column."}})
async def audit_rows(
    audit: AuditDep,
    subset: Annotated[
        Literal["rarest", "typical", "all"], Query(description="The K rarest rows, the K most typical, or all.")
    ] = "rarest",
    sort: Annotated[str | None, Query(description="Column to sort by (default rarity).")] = None,
    order: Annotated[Literal["asc", "desc"] | None, Query(description="Default: desc, asc for typical.")] = None,
    q: Annotated[str, Query(max_length=200, description="Case-insensitive text every kept row contains.")] = "",
    column: Annotated[str | None, Query(description="Look for q only in this column.")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    thumbs: Annotated[bool, Query(description="Inline thumbnails as data: URLs where the audit has them.")] = True,
) -> dict[str, Any]:
    """A page of rows: filtered by q, sorted, then offset/limit; thumbnails inlined (the page may need a key)."""
    query = RowQuery(
        subset=subset, sort=sort, descending=None if order is None else order == "desc", q=q, column=column or None,
        offset=offset, limit=limit,
    )
    return await run_in_threadpool(audit.rows, query, thumbs)


@audit_api.get("/histograms", responses=_AUDIT_ERRORS)
async def audit_histograms(audit: AuditDep) -> dict[str, Any]:
    """The fitted latent histograms: per axis a label, bin edges and counts."""
    if not audit.browser or not audit.browser.get("latent_histograms"):
        raise ApiError(404, "no_histograms", "this audit has no browser.json; run 'debias audit' again to write it")
    return {"histograms": audit.browser["latent_histograms"]}


@audit_api.get(
    "/thumbs/{row}.png", response_class=Response,
    responses={**_AUDIT_ERRORS, 200: {"content": {"image/png": {}}, "description": "The row's thumbnail."}},
)
async def audit_thumb(audit: AuditDep, row: int) -> Response:
    """The thumbnail of one row (only the K rarest and K most typical rows have one)."""
    path = audit.thumb_path(row)
    if path is None:
        raise ApiError(404, "no_thumbnail", f"row {row} has no thumbnail")
    return FileResponse(path, media_type="image/png")
