"""The HTTP routes: thin, each one validates, calls the engine and shapes the answer."""

from __future__ import annotations

import base64
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, File, Query, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import (
    UploadFile as StarletteUploadFile,  # what the form holds (FastAPI's subclasses it)
)

from debias.data.intake import UploadError
from debias.density.detector import NoveltyResults
from debias.density.heatmaps import heatmap_png
from debias.service.batcher import QueueFull
from debias.service.decode_budget import DecodeBusy
from debias.service.deps import EngineDep, ReadyEngineDep, SettingsDep, require_api_key
from debias.service.engine import BadUploads, ScoringEngine
from debias.service.errors import ApiError, ErrorBody, FileError
from debias.service.schemas import (
    Drift,
    FileProblem,
    Health,
    ImageScore,
    ModelCard,
    ModelSummary,
    Readiness,
    ScoreResponse,
)

_ERRORS = {
    400: {"model": ErrorBody, "description": "No file can be scored: empty, truncated or corrupt (each file named)."},
    401: {"model": ErrorBody, "description": "Missing or wrong X-API-Key (when the server has a key)."},
    413: {"model": ErrorBody, "description": "Body, file, image (pixels) or file count over the limit."},
    415: {"model": ErrorBody, "description": "Not an image, or an unsupported format or pixel mode."},
    408: {"model": ErrorBody, "description": "The request body arrived too slowly (idle or total timeout)."},
    422: {"model": ErrorBody, "description": "The request has no `files` field, or its parts are not files."},
    503: {"model": ErrorBody, "description": "The model is still loading, or too many images are queued or decoding "
          "(Retry-After)."},
}
_STATUS_OF_KIND = {"too_large": 413, "unsupported": 415, "not_image": 415, "empty": 400, "corrupt": 400,
                   "not_a_file": 422}
_CODE_OF_STATUS = {413: "too_large", 415: "unsupported_image", 400: "bad_image", 422: "not_a_file"}

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], tags=["novelty"])
ops = APIRouter(tags=["operations"])


def _model_summary(engine: ScoringEngine) -> ModelSummary:
    card = engine.detector.card  # type: ignore[union-attr]
    return ModelSummary(
        run=card.get("run", ""), model_sha256=card["model_sha256"], debias_version=card["debias_version"],
        target_fpr=card["target_fpr"], threshold=card["threshold"],
    )


def _file_problem(err: UploadError) -> FileProblem:
    status = _STATUS_OF_KIND.get(err.kind, 400)
    return FileProblem(status=status, code=_CODE_OF_STATUS[status], reason=err.reason)


def _all_failed(problems: list[tuple[int, UploadError]], names: list[str]) -> ApiError:
    """No file could be scored: the request as a whole gets the 4xx of its first file, naming every file."""
    files = [FileError(index=i, filename=names[i], reason=e.reason) for i, e in problems]
    status = _STATUS_OF_KIND.get(problems[0][1].kind, 400)
    return ApiError(status, _CODE_OF_STATUS[status], f"{len(files)} of {len(names)} files cannot be scored", files)


def _heatmaps(res: NoveltyResults) -> list[str]:
    assert res.images is not None and res.recon is not None
    return [
        base64.b64encode(heatmap_png(res.images[i].numpy(), res.recon[i].numpy())).decode("ascii")
        for i in range(len(res))
    ]


@v1.post("/score", response_model=ScoreResponse, responses=_ERRORS)
async def score(
    files: Annotated[
        list[UploadFile | str],
        File(description="One or more images (JPEG, PNG, WebP, BMP, GIF; 8-bit), each a file part with a filename."),
    ],
    engine: ReadyEngineDep,
    settings: SettingsDep,
    heatmap: Annotated[bool, Query(description="Add a base64 PNG reconstruction-error heatmap per image.")] = False,
) -> ScoreResponse:
    """Score images for novelty against the training data. One result per file, in request order: a file that
    cannot be scored carries its own `error` while the others are scored (200). Only when no file can be scored
    does the whole request get that 4xx."""
    names = [(f.filename if isinstance(f, StarletteUploadFile) else None) or f"file {i}" for i, f in enumerate(files)]
    if len(files) > settings.max_files:
        extra = [
            FileError(index=i, filename=names[i], reason=f"over the limit of {settings.max_files} files per request")
            for i in range(settings.max_files, len(files))
        ]
        raise ApiError(413, "too_many_files", f"{len(files)} files sent; the limit is {settings.max_files}", extra)
    parts = [i for i, f in enumerate(files) if isinstance(f, StarletteUploadFile)]
    # A part without a filename is a form field: the multipart parser has already turned its bytes into text.
    outcome: list[np.ndarray | bytes | UploadError] = [
        UploadError("not_a_file", "a form field, not a file: send each image as a file part with a filename "
                    "(curl -F files=@image.png)")
    ] * len(files)
    try:
        decoded = await engine.prepare([await files[i].read() for i in parts])  # type: ignore[union-attr]
    except DecodeBusy as exc:
        raise ApiError(503, "busy", f"too many large images decoding at once ({exc}); retry shortly",
                       headers={"Retry-After": "1"}) from None
    for i, got in zip(parts, decoded):
        outcome[i] = got
    problems = [(i, o) for i, o in enumerate(outcome) if isinstance(o, UploadError)]
    if len(problems) == len(files):
        raise _all_failed(problems, names)
    good = [i for i, o in enumerate(outcome) if not isinstance(o, UploadError)]
    try:
        res = await engine.score([outcome[i] for i in good], keep_recon=heatmap)  # type: ignore[misc]
    except BadUploads as exc:  # the model owner could not decode them (GPU JPEG decode): the request's 4xx
        raise _all_failed([(good[j], e) for j, e in exc.problems], names) from None
    except QueueFull as exc:
        raise ApiError(503, "busy", str(exc), headers={"Retry-After": "1"}) from None
    maps = await run_in_threadpool(_heatmaps, res) if heatmap else [None] * len(res)
    results = [ImageScore(filename=names[i], error=_file_problem(err)) for i, err in problems]  # request order below
    for j, i in enumerate(good):
        results.insert(i, ImageScore(filename=names[i], heatmap_png=maps[j], **res.record(j)))
    return ScoreResponse(model=_model_summary(engine), n_scored=len(good), n_failed=len(problems), results=results)


@v1.get("/model", response_model=ModelCard, responses={401: _ERRORS[401], 503: _ERRORS[503]})
async def model_card(engine: ReadyEngineDep, settings: SettingsDep) -> ModelCard:
    """What is being served: the model, the data it and the scorer were fitted on, calibration and limits."""
    det = engine.detector
    assert det is not None
    card = det.card
    return ModelCard(
        run=card.get("run", ""), model_sha256=card["model_sha256"], debias_version=card["debias_version"],
        image_size=card["image_size"], channels=card["channels"], latent_dim=card["latent_dim"],
        trained_on=card.get("trained_on", {}), fitted_on=card.get("fitted_on", {}), novelty=card["novelty"],
        calibration_size=card["calibration_size"], target_fpr=card["target_fpr"], threshold=card["threshold"],
        fitted_at=card["fitted_at"], device=str(det.device),
        batching={"max_batch_size": settings.max_batch_size, "max_wait_ms": settings.max_wait_ms,
                  "gpu_jpeg_decode": engine.gpu_jpeg},
        limits={"max_files": settings.max_files, "max_body_bytes": settings.max_body_bytes,
                "max_file_bytes": settings.max_file_bytes, "max_pixels": settings.max_pixels,
                "formats": sorted(settings.formats)},
    )


@v1.get("/drift", response_model=Drift, responses={401: _ERRORS[401], 503: _ERRORS[503]})
async def drift(engine: ReadyEngineDep) -> Drift:
    """The recent window of novelty scores against the calibration distribution."""
    return Drift(**await run_in_threadpool(engine.drift))


@ops.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive (it may still be loading; see /readyz)."""
    return Health(status="ok")


@ops.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
async def readyz(engine: EngineDep):
    """200 once the model is loaded, the scorer fitted and the model warmed up; 503 before (or if loading failed)."""
    body = Readiness(ready=engine.ready, state=engine.state, error=engine.error)
    return JSONResponse(body.model_dump(), status_code=200 if engine.ready else 503)


@ops.get("/metrics", response_class=PlainTextResponse)
async def metrics(engine: EngineDep) -> PlainTextResponse:
    """Prometheus metrics: requests, latency, batch sizes, images scored and flagged, fraction novel."""
    if engine.batcher is not None:
        engine.metrics.queue_images.set(engine.batcher.pending_images)
    return PlainTextResponse(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
