"""The service in-process (TestClient runs the lifespan): scoring, the bad-input corpus, limits, auth, readiness,
metrics, drift, and a bounded schemathesis run against the OpenAPI schema."""

from __future__ import annotations

import base64
import io
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from debias.density.detector import open_detector
from debias.service.app import create_app
from debias.service.settings import Settings
from tests.novelty_support import (
    bad_uploads,
    encode,
    noise_images,
    shapes_images,
    tiny_run,
)
from tests.schema_fuzz import fuzz_operations

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's TestClient warns that httpx will be replaced by httpx2
    from fastapi.testclient import TestClient


def wait_ready(client: TestClient, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            return r.json()
        assert r.status_code == 503 and r.json()["ready"] is False
        assert r.json()["state"] != "failed", r.json()
        time.sleep(0.05)
    raise AssertionError("service did not become ready")


def upload(*items: tuple[str, bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (name, data, "application/octet-stream")) for name, data in items]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tiny_run(tmp_path_factory.mktemp("service") / "run")
    open_detector(run, progress=False)  # fit novelty.pt once for every app of this module
    return run


@pytest.fixture(scope="module")
def client(run):
    app = create_app(Settings(model_dir=run, device="cpu", max_body_bytes=4_000_000, max_files=8, drift_window=50))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def test_health_ready_and_model_card(client, run):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "state": "ready", "error": None}
    card = client.get("/v1/model").json()
    det = open_detector(run, progress=False)
    assert card["calibration_size"] == det.calibrator.n_calibration_ == 60
    assert card["target_fpr"] == 0.05 and card["threshold"] == pytest.approx(det.calibrator.threshold_)
    assert card["image_size"] == 32 and card["trained_on"]["fingerprint"] == card["fitted_on"]["fingerprint"]
    assert card["limits"]["max_files"] == 8 and card["batching"]["max_batch_size"] == 64


def test_score_matches_the_library_in_request_order(client, run):
    imgs = np.concatenate([shapes_images(3), noise_images(2)])
    r = client.post("/v1/score", files=upload(*[(f"img{i}.png", encode(a)) for i, a in enumerate(imgs)]))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["filename"] for x in body["results"]] == [f"img{i}.png" for i in range(5)]
    det = open_detector(run, progress=False)
    import torch

    ref = det.score_batch(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    for i, res in enumerate(body["results"]):
        assert res["novelty"] == pytest.approx(ref.novelty[i], rel=1e-4, abs=1e-6)
        assert res["p_value"] == pytest.approx(ref.p_value[i], abs=1 / 61 + 1e-9)
        assert res["rarity"] == pytest.approx(ref.rarity[i], rel=1e-6)
        assert len(res["top_dims"]) == 5 and res["heatmap_png"] is None
        assert res["driver"] in ("posterior_knn", "recon_error", "pixel_density", "embedding_knn")
        assert set(res["statistics"]) == {"posterior_knn", "recon_error", "pixel_density", "embedding_knn"}
    assert all(x["is_novel"] for x in body["results"][3:])  # noise
    assert body["model"]["run"] == "run" and body["model"]["target_fpr"] == 0.05


def test_heatmap_on_request(client):
    r = client.post("/v1/score?heatmap=true", files=upload(("a.png", encode(shapes_images(1)[0]))))
    png = base64.b64decode(r.json()["results"][0]["heatmap_png"])
    assert Image.open(io.BytesIO(png)).size == (384, 128)


@pytest.mark.parametrize("name", list(bad_uploads()))
def test_a_bad_file_among_good_ones_gets_its_own_error(client, run, name):
    """Issue 14, item 5: the good files are scored, the bad one carries its error (status, code, reason); alone, the
    bad file gets that status for the whole request, naming the file."""
    data, fragment, status = bad_uploads()[name]
    imgs = shapes_images(2)
    r = client.post("/v1/score", files=upload(("fine.png", encode(imgs[0])), (name, data), ("also.png", encode(imgs[1]))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["n_scored"], body["n_failed"]) == (2, 1)
    assert [res["filename"] for res in body["results"]] == ["fine.png", name, "also.png"]
    bad = body["results"][1]
    assert bad["error"]["status"] == status and fragment in bad["error"]["reason"], bad
    assert bad["novelty"] is None and bad["p_value"] is None
    det = open_detector(run, progress=False)
    alone = det.score_batch(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    for k, res in zip((0, 1), (body["results"][0], body["results"][2])):
        assert res["error"] is None and res["novelty"] == pytest.approx(alone.novelty[k], rel=1e-4, abs=1e-6)
    r = client.post("/v1/score", files=upload((name, data)))
    assert r.status_code == status, r.text
    assert r.json()["files"] == [{"index": 0, "filename": name, "reason": bad["error"]["reason"]}]
    assert "1 of 1" in r.json()["message"]


def test_a_form_field_instead_of_a_file_is_named(client):
    """Issue 14, item 6: a part without a filename is a text field to the multipart parser (its bytes are gone); it
    gets its own 422 "not_a_file" instead of "Expected UploadFile", and files beside it are scored."""
    good = encode(shapes_images(1)[0])
    r = client.post("/v1/score", data={"files": "not a file"})
    assert r.status_code == 422 and r.json()["error"] == "not_a_file"
    assert "file part with a filename" in r.json()["files"][0]["reason"]
    body = (b'--b\r\nContent-Disposition: form-data; name="files"\r\n\r\nsome text\r\n'
            b'--b\r\nContent-Disposition: form-data; name="files"; filename="ok.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + good + b"\r\n--b--\r\n")
    r = client.post("/v1/score", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 200 and r.json()["n_scored"] == 1
    assert r.json()["results"][0]["error"]["code"] == "not_a_file" and r.json()["results"][1]["error"] is None


def test_limits(client):
    good = encode(shapes_images(1)[0])
    r = client.post("/v1/score", files=upload(*[(f"f{i}.png", good) for i in range(11)]))
    assert r.status_code == 413 and r.json()["error"] == "too_many_files"
    assert [f["filename"] for f in r.json()["files"]] == ["f8.png", "f9.png", "f10.png"]
    big = upload(("big.bin", b"\0" * 5_000_000))
    r = client.post("/v1/score", files=big)
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"

    def chunks():  # no Content-Length: the limit is enforced while the body streams
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(50):
            yield b"\0" * 100_000
        yield b"\r\n--b--\r\n"

    r = client.post("/v1/score", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413 and r.json()["error"] == "body_too_large"
    r = client.post("/v1/score")
    assert r.status_code == 422 and r.json()["error"] == "invalid_request" and "files" in r.json()["message"]
    # past the multipart parser's own cap (4 x max_files + 16 parts): still 413 too_many_files, not its 400
    r = client.post("/v1/score", files=upload(*[(f"f{i}.png", good) for i in range(300)]))
    assert r.status_code == 413 and r.json()["error"] == "too_many_files", r.text
    assert client.get("/nowhere").json()["error"] == "not_found"
    assert client.post("/v1/score", files=upload(("fine.png", good))).status_code == 200


def test_metrics_and_drift(client):
    for _ in range(3):
        client.post("/v1/score", files=upload(("n.png", encode(noise_images(1, seed=9)[0]))))
    text = client.get("/metrics").text
    for name in ("debias_http_requests_total", "debias_http_request_duration_seconds_bucket",
                 "debias_model_batch_size_bucket", "debias_images_novel_total", "debias_novel_fraction",
                 "debias_files_rejected_total", "debias_ready 1.0"):
        assert name in text, name
    assert 'route="/v1/score",status="200"' in text
    drift = client.get("/v1/drift").json()
    assert 1 <= drift["window"] <= 50 and drift["n_calibration"] == 60
    assert 0 <= drift["fraction_novel"] <= 1 and 0 <= drift["ks_p_value"] <= 1


def test_novel_fraction_gauge_counts_the_drift_window_only(tmp_path):
    """The /metrics gauge is kept by counting flags in and out of the window (O(images) per request); it must equal
    the fraction of novel images among the last ``drift_window`` scored, as /v1/drift computes it."""
    import asyncio

    from debias.density.detector import NoveltyResults
    from debias.service.engine import ScoringEngine
    from debias.service.prometheus_metrics import ServiceMetrics

    async def submit(payload, n):  # stands in for the model: the "images" are novelty values, novel when > 0
        v = np.asarray(payload.images, dtype=float)
        return NoveltyResults(novelty=v, p_value=np.where(v > 0, 0.01, 0.5), is_novel=v > 0, rarity=v,
                              recon_error=v, top_dims=[[] for _ in v])

    metrics = ServiceMetrics()
    engine = ScoringEngine(Settings(model_dir=tmp_path, drift_window=3), metrics, submit)
    sent: list[float] = []
    for batch in ([1.0], [-1.0, 2.0], [-1.0], [-1.0, -2.0, 3.0], [4.0, 5.0]):
        asyncio.run(engine.score(batch))
        sent += batch
        window = sent[-3:]
        assert metrics.novel_fraction._value.get() == pytest.approx(np.mean(np.array(window) > 0))
        assert list(engine.recent) == window


def test_api_key(run, monkeypatch):
    monkeypatch.setenv("DEBIAS_API_KEY", "s3cret-key")
    app = create_app(Settings(model_dir=run, device="cpu"))  # the key comes from the environment
    good = upload(("a.png", encode(shapes_images(1)[0])))
    with TestClient(app) as c:
        wait_ready(c)
        for headers in ({}, {"X-API-Key": "wrong"}, {"X-API-Key": "s3cret-key "}, {"X-API-Key": ""}):
            r = c.post("/v1/score", files=good, headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized", headers
            assert c.get("/v1/model", headers=headers).status_code == 401
        assert c.post("/v1/score", files=good, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert c.get("/v1/drift", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # probes stay open
        schema = c.get("/openapi.json").json()
        assert "APIKeyHeader" in schema["components"]["securitySchemes"]


def test_not_ready_until_loaded(run, monkeypatch):
    from debias.service import engine as engine_module

    gate = threading.Event()
    real = engine_module.open_detector

    def slow_open(*args, **kwargs):
        gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "open_detector", slow_open)
    with TestClient(create_app(Settings(model_dir=run, device="cpu"))) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["state"] == "loading"
        r = c.post("/v1/score", files=upload(("a.png", encode(shapes_images(1)[0]))))
        assert r.status_code == 503 and r.json()["error"] == "not_ready" and r.headers["retry-after"] == "1"
        gate.set()
        wait_ready(c)


def test_failed_load_is_reported(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    with TestClient(create_app(Settings(model_dir=tmp_path, device="cpu"))) as c:
        deadline = time.monotonic() + 30
        while c.get("/readyz").json()["state"] != "failed" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.get("/readyz")
        assert r.status_code == 503 and "cannot load checkpoint" in r.json()["error"]
        assert c.get("/healthz").status_code == 200
        assert c.get("/v1/model").status_code == 503


def test_schemathesis_finds_no_server_errors(run):
    """Bounded property-based run over every operation of the OpenAPI schema: no 5xx, whatever is sent."""
    schemathesis = pytest.importorskip("schemathesis")

    app = create_app(Settings(model_dir=run, device="cpu", max_files=4))
    # schemathesis runs the app's lifespan itself (once, kept for the process), which starts the engine
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    deadline = time.monotonic() + 60
    while not app.state.engine.ready and time.monotonic() < deadline:
        assert app.state.engine.state != "failed", app.state.engine.error
        time.sleep(0.05)
    problems, seen = fuzz_operations(schema)
    assert not problems, problems
    assert any(label == "POST /v1/score" for label, _ in seen)  # the upload route was exercised


def test_non_ascii_api_key_is_refused_at_start_up(tmp_path, monkeypatch, capsys):
    """A key with characters outside printable ASCII could never match the Latin-1 header; refuse it in one line."""
    import sys

    from pydantic import ValidationError

    from debias.pipelines.cli import main

    with pytest.raises(ValidationError, match="printable ASCII"):
        Settings(model_dir=tmp_path, api_key="clé-secrète")
    assert Settings(model_dir=tmp_path, api_key="plain-KEY_123").api_key is not None
    monkeypatch.setenv("DEBIAS_API_KEY", "clé")
    monkeypatch.setattr(sys, "argv", ["debias", "serve", "--model", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and "api_key" in err[0] and "printable ASCII" in err[0]


def test_security_headers_on_pages_api_and_errors(client):
    """Every answer says nosniff and forbids framing; the pages (and the API) carry the CSP, the Swagger page not."""
    from debias.service.middleware import PAGE_CSP

    for path in ("/", "/static/score.js", "/v1/model", "/healthz"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
        assert r.headers["content-security-policy"] == PAGE_CSP and "frame-ancestors 'none'" in PAGE_CSP
    too_big = client.post("/v1/score", content=b"x" * 10, headers={"content-length": str(5_000_000)})
    assert too_big.status_code == 413 and too_big.headers["x-content-type-options"] == "nosniff"
    docs = client.get("/docs")
    assert docs.headers["x-frame-options"] == "DENY" and "content-security-policy" not in docs.headers


def test_protect_ops_puts_metrics_and_docs_behind_the_key(run, monkeypatch):
    monkeypatch.setenv("DEBIAS_API_KEY", "s3cret-key")
    for protect in (False, True):
        app = create_app(Settings(model_dir=run, device="cpu", protect_ops=protect))
        with TestClient(app) as c:
            for path in ("/metrics", "/docs", "/openapi.json"):
                assert c.get(path).status_code == (401 if protect else 200), (protect, path)
                assert c.get(path, headers={"X-API-Key": "s3cret-key"}).status_code == 200
            assert c.get("/healthz").status_code == 200 and c.get("/").status_code == 200  # probes and pages open


def test_pixel_budget_waits_in_order_and_gives_up_after_the_wait():
    """Issue 14, item 1, the mechanism alone: room is granted first come first served, a waiter that finds none in
    time gets DecodeBusy and leaves the queue, and a request larger than the budget takes the whole budget."""
    import asyncio

    from debias.service.decode_budget import DecodeBusy, PixelBudget

    async def scenario() -> list[str]:
        budget = PixelBudget(100)
        log: list[str] = []
        assert await budget.acquire(60, wait_s=0) == 60

        async def waiter(name: str, pixels: int, wait_s: float) -> None:
            try:
                got = await budget.acquire(pixels, wait_s)
            except DecodeBusy:
                log.append(f"{name} busy")
                return
            log.append(f"{name} got {got}")
            await asyncio.sleep(0.01)
            budget.release(got)

        tasks = [asyncio.create_task(waiter("big", 500, 1.0)), asyncio.create_task(waiter("late", 10, 0.02))]
        await asyncio.sleep(0.05)  # "late" would fit beside the 60, but it may not pass "big"; it gives up
        assert budget.in_use == 60 and log == ["late busy"]
        budget.release(60)
        await asyncio.gather(*tasks)
        assert budget.in_use == 0 and budget.peak == 100
        return log

    assert asyncio.run(scenario()) == ["late busy", "big got 100"]
