"""The web pages: the audit browser's JSON endpoints (TestClient), then both pages end to end in real headless
Chromium (Debian's /usr/bin/chromium driven by Playwright) against a real uvicorn server on a free port.

The browser tests install nothing; they skip, saying why, when Chromium or Playwright is missing (`.ci/run` installs
Debian's chromium so that CI runs them). Screenshots go to test-artifacts/ at the repository root."""

from __future__ import annotations

import base64
import io
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from debias.density.detector import open_detector
from debias.pipelines.audit import AuditJob, run_audit
from debias.service.app import create_app
from debias.service.settings import Settings
from tests.novelty_support import (
    TINY_SOURCE,
    encode,
    noise_images,
    shapes_images,
    tiny_run,
)
from tests.schema_fuzz import fuzz_operations

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's TestClient warns that httpx will be replaced by httpx2
    from fastapi.testclient import TestClient

KEY = "web-test-key"
CHROMIUM = Path(os.environ.get("DEBIAS_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
STATIC = Path(__file__).resolve().parents[1] / "service" / "static"
# Chromium as root on a closed network: no sandbox, and none of the background connections it would wait on.
# Playwright gives every launch a fresh temporary profile (--user-data-dir) itself.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tiny_run(tmp_path_factory.mktemp("web") / "run")
    open_detector(run, progress=False)  # fit novelty.pt once, so every server here only loads it
    return run


@pytest.fixture(scope="module")
def audit_dir(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("web-audit") / "audit"
    with pytest.MonkeyPatch.context() as mp:  # module scope runs before the per-test cache fixture
        mp.setenv("DEBIAS_CACHE_DIR", str(tmp_path_factory.mktemp("web-cache")))
        run_audit(AuditJob(model=run, data=TINY_SOURCE, out=out, group_by=["shape", "group"], device="cpu",
                           report=False, progress=False))
    return out


@pytest.fixture(scope="module")
def scores(audit_dir) -> pd.DataFrame:
    return pd.read_parquet(audit_dir / "scores.parquet")


def client_for(run: Path, audit: Path | None, **kw) -> TestClient:
    # no `with`: the lifespan (model loading) is not needed for the audit endpoints
    return TestClient(create_app(Settings(model_dir=run, audit_dir=audit, device="cpu", **kw)))


# -- what `debias audit` writes for the browser ---------------------------------------------------------------------
def test_audit_writes_thumbnails_and_histograms(audit_dir, scores):
    meta = json.loads((audit_dir / "browser.json").read_text())
    order = np.argsort(-scores["rarity"].to_numpy(), kind="stable")
    k = meta["k"]
    assert k == min(64, len(scores)) and meta["n_rows"] == len(scores)
    assert meta["thumbs"]["rarest"] == order[:k].tolist()
    assert meta["thumbs"]["typical"] == order[::-1][:k].tolist()
    pngs = sorted(int(p.stem) for p in (audit_dir / "thumbs").glob("*.png"))
    assert pngs == sorted(set(meta["thumbs"]["rarest"]) | set(meta["thumbs"]["typical"]))
    img = Image.open(audit_dir / "thumbs" / f"{pngs[0]}.png")
    assert img.size == (64, 64) and img.mode == "RGB"  # 32 px images upscaled x2
    hists = meta["latent_histograms"]
    assert len(hists) == 6  # latent_dim of the tiny run, all axes kept
    for h in hists:
        assert len(h["edges"]) == len(h["counts"]) + 1 and sum(h["counts"]) == len(scores)
        assert h["edges"] == sorted(h["edges"])


# -- JSON endpoints -------------------------------------------------------------------------------------------------
def test_summary_endpoint(run, audit_dir, scores):
    body = client_for(run, audit_dir).get("/v1/audit/summary").json()
    assert body["n_rows"] == len(scores) and body["k"] == 64 and body["has_thumbs"] and body["has_histograms"]
    names = [c["name"] for c in body["columns"]]
    assert names == ["row", *scores.columns]
    assert {c["name"]: c["numeric"] for c in body["columns"]}["rarity"] is True
    assert set(body["summary"]["groups"]) == {"shape", "group", "shape x group"}


def test_rows_are_sorted_filtered_and_paged_server_side(run, audit_dir, scores):
    c = client_for(run, audit_dir)
    meta = json.loads((audit_dir / "browser.json").read_text())

    rarest = c.get("/v1/audit/rows").json()  # default: the K rarest, rarest first
    assert rarest["sort"] == "rarity" and rarest["descending"] and rarest["total"] == 64
    assert [r["row"] for r in rarest["rows"]] == meta["thumbs"]["rarest"]
    first = rarest["rows"][0]
    assert first["rarity"] == pytest.approx(scores["rarity"].max())
    assert first["thumb"].startswith("data:image/png;base64,")
    png = base64.b64decode(first["thumb"].split(",", 1)[1])
    assert png == (audit_dir / "thumbs" / f"{first['row']}.png").read_bytes()

    typical = c.get("/v1/audit/rows", params={"subset": "typical"}).json()
    assert not typical["descending"] and typical["rows"][0]["rarity"] == pytest.approx(scores["rarity"].min())

    by_err = c.get("/v1/audit/rows", params={"subset": "all", "sort": "recon_error", "order": "asc", "limit": 1000})
    rows = by_err.json()["rows"]
    assert len(rows) == len(scores)
    assert [r["row"] for r in rows] == scores["recon_error"].sort_values(kind="stable").index.tolist()

    shape = scores["shape"].iloc[0]
    filt = c.get("/v1/audit/rows", params={"subset": "all", "q": shape.upper(), "column": "shape", "limit": 7,
                                           "offset": 5}).json()
    expected = scores.index[scores["shape"].astype(str).str.contains(shape, case=False, regex=False)]
    assert filt["total"] == len(expected) < len(scores)
    assert all(r["shape"] == shape for r in filt["rows"]) and len(filt["rows"]) == 7
    whole = c.get("/v1/audit/rows", params={"subset": "all", "q": shape, "column": "shape", "limit": 1000}).json()
    assert [r["row"] for r in whole["rows"][5:12]] == [r["row"] for r in filt["rows"]]  # the same page of one order
    assert all(r["thumb"] is None for r in whole["rows"] if r["row"] not in set(meta["thumbs"]["rarest"])
               | set(meta["thumbs"]["typical"]))

    bad = c.get("/v1/audit/rows", params={"sort": "nope"})
    assert bad.status_code == 400 and bad.json()["error"] == "bad_column"
    assert c.get("/v1/audit/rows", params={"column": "nope", "q": "x"}).status_code == 400
    assert c.get("/v1/audit/rows", params={"subset": "other"}).status_code == 422


def test_thumbnails_and_histograms_endpoints(run, audit_dir, scores):
    c = client_for(run, audit_dir)
    meta = json.loads((audit_dir / "browser.json").read_text())
    row = meta["thumbs"]["rarest"][0]
    r = c.get(f"/v1/audit/thumbs/{row}.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    no_thumb = next(i for i in range(len(scores)) if i not in set(meta["thumbs"]["rarest"] + meta["thumbs"]["typical"]))
    assert c.get(f"/v1/audit/thumbs/{no_thumb}.png").json()["error"] == "no_thumbnail"
    assert c.get("/v1/audit/histograms").json()["histograms"] == meta["latent_histograms"]


def test_an_older_audit_without_browser_json_still_browses(run, audit_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for name in ("scores.parquet", "summary.json"):
        shutil.copy2(audit_dir / name, old / name)
    c = client_for(run, old)
    body = c.get("/v1/audit/rows").json()
    assert body["total"] == 64 and all(r["thumb"] is None for r in body["rows"])
    r = c.get("/v1/audit/histograms")
    assert r.status_code == 404 and "debias audit" in r.json()["message"]


def test_without_an_audit_dir_the_api_says_404_and_the_page_says_why(run, tmp_path):
    c = client_for(run, None)
    r = c.get("/v1/audit/summary")
    assert r.status_code == 404 and r.json()["error"] == "no_audit" and "--audit" in r.json()["message"]
    page = c.get("/audit")
    assert page.status_code == 404 and "text/html" in page.headers["content-type"]
    assert "debias serve --model RUN_DIR --audit AUDIT_DIR" in page.text
    r = client_for(run, tmp_path).get("/v1/audit/rows")  # configured, but not an audit
    assert r.status_code == 404 and "scores.parquet" in r.json()["message"]


def test_pages_are_public_and_the_audit_api_needs_the_key(run, audit_dir):
    c = client_for(run, audit_dir, api_key=KEY)
    for path in ("/", "/audit", "/static/common.js", "/static/score.js", "/static/audit.js", "/static/style.css"):
        assert c.get(path).status_code == 200, path
    assert c.get("/v1/audit/summary").status_code == 401
    assert c.get("/v1/audit/summary", headers={"X-API-Key": KEY}).status_code == 200
    assert c.get("/v1/audit/thumbs/0.png").status_code == 401


def test_static_assets_reference_nothing_outside_the_server():
    text = {p.name: p.read_text() for p in STATIC.iterdir()}
    assert {"index.html", "audit.html", "no_audit.html", "common.js", "score.js", "audit.js", "style.css"} <= set(text)
    for name, body in text.items():
        # the only absolute URL allowed is the SVG namespace, an identifier that is never fetched
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", body)) - {"http://www.w3.org/2000/svg"}
        assert not urls, (name, urls)
        assert "@import" not in body and "localStorage" not in body, name


def test_schemathesis_finds_no_server_errors_in_the_audit_api(run, audit_dir):
    """Bounded property-based run over the /v1/audit operations with a real audit behind them: no 5xx."""
    schemathesis = pytest.importorskip("schemathesis")

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(Settings(model_dir=run, audit_dir=audit_dir,
                                                                                 device="cpu")))
    problems, seen = fuzz_operations(schema, "/v1/audit")
    assert not problems, problems
    assert {label for label, status in seen if status == 200} >= {"GET /v1/audit/summary", "GET /v1/audit/rows"}


# -- the real browser ---------------------------------------------------------------------------------------------
@contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """uvicorn in a thread on a free port (port 0: the kernel picks, no race); yields the base URL once ready."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 90
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{base}/readyz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the service did not become ready"
        time.sleep(0.1)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def chromium():
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install -e '.[dev]')")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def open_server(run, audit_dir) -> Iterator[str]:
    with serving(Settings(model_dir=run, audit_dir=audit_dir, device="cpu", max_wait_ms=0)) as base:
        yield base


@pytest.fixture(scope="module")
def keyed_server(run, audit_dir) -> Iterator[str]:
    with serving(Settings(model_dir=run, audit_dir=audit_dir, device="cpu", max_wait_ms=0, api_key=KEY)) as base:
        yield base


@pytest.fixture
def page(chromium):
    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    requested: list[str] = []  # every URL the page asked for: none may leave the server
    page.on("request", lambda req: requested.append(req.url))
    page.requested = requested
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, errors  # no uncaught JavaScript error on any page


def _png_file(name: str, arr: np.ndarray) -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": encode(arr)}


def _expected(run: Path, arr: np.ndarray):
    det = open_detector(run, progress=False)
    return det.score_batch(torch.from_numpy(arr[None]).permute(0, 3, 1, 2).float() / 255)


def _check_card(page, run: Path, name: str, arr: np.ndarray) -> None:
    card = page.locator(f'.result[data-filename="{name}"]')
    card.locator("xpath=self::*[contains(@class, 'state-done')]").wait_for()
    ref = _expected(run, arr)
    novelty = card.locator(".novelty")
    assert float(novelty.get_attribute("data-value")) == pytest.approx(float(ref.novelty[0]), rel=1e-4, abs=1e-6)
    assert float(novelty.text_content()) == pytest.approx(float(ref.novelty[0]), rel=1e-2), name  # as displayed
    p_value = float(card.locator(".p-value").get_attribute("data-value"))
    assert abs(p_value - float(ref.p_value[0])) <= 1 / 61 + 1e-9, name  # conformal: one calibration image apart
    assert float(card.locator(".p-value").text_content()) == pytest.approx(p_value, rel=1e-2)
    badge = card.locator(".badge").text_content()
    assert badge == ("novel" if bool(ref.is_novel[0]) else "typical"), name
    assert card.locator(".dims tbody tr").count() == 5  # DEBIAS_TOP_K default
    assert card.locator(".heatmap img").evaluate("img => img.complete && img.naturalWidth") > 0
    assert card.locator("img.thumb").evaluate("img => img.complete && img.naturalWidth") == 32


def test_browser_upload_shows_score_badge_and_heatmap(page, open_server, run):
    page.goto(f"{open_server}/")
    page.locator("#card-body dt", has_text="novelty threshold").wait_for()
    assert "target false-positive rate" in page.locator("#card-body").text_content()
    typical, noise = shapes_images(1, seed=5)[0], noise_images(1, seed=6)[0]
    page.set_input_files("#files", [
        _png_file("shape.png", typical), _png_file("noise.png", noise),
        {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture\n" * 10},
    ])
    _check_card(page, run, "shape.png", typical)
    _check_card(page, run, "noise.png", noise)
    bad = page.locator('.result[data-filename="notes.txt"]')
    bad.locator("xpath=self::*[contains(@class, 'state-error')]").wait_for()
    assert bad.locator(".badge").text_content() == "error"
    assert "415" in bad.text_content() and "not an image" in bad.text_content()
    assert page.locator("#key-form").is_hidden()  # no key on this server: never asked
    page.screenshot(path=str(ARTIFACTS / "web-score.png"), full_page=True)
    assert all(url.startswith(open_server) or url.startswith(("blob:", "data:")) for url in page.requested)


def _column(page, name: str) -> list[float]:
    return [float(v) for v in page.locator(f'#rows tbody td[data-column="{name}"]').evaluate_all(
        "tds => tds.map(td => td.dataset.value)")]


def test_browser_audit_table_sorts_and_filters(page, open_server, scores, audit_dir):
    from playwright.sync_api import expect

    page.goto(f"{open_server}/audit")
    page.locator('#rows th[data-column="rarity"][aria-sort="descending"]').wait_for()
    rarity = _column(page, "rarity")
    assert len(rarity) == 64 and rarity == sorted(rarity, reverse=True)
    assert rarity[0] == pytest.approx(scores["rarity"].max())
    assert page.locator("#rows tbody img").count() == 64  # every rarest row has its thumbnail
    # ... captioned with its groups (--group-by shape,group) and its path (issue 15)
    first = scores.sort_values("rarity_rank").iloc[0]
    caption = page.locator("#rows tbody figcaption").first.text_content()
    assert caption == f"{first['shape']} × {first['group']} · {first['path']}"
    rarest_rows = set(json.loads((audit_dir / "browser.json").read_text())["thumbs"]["rarest"])

    page.click('#rows th[data-column="recon_error"]')
    page.locator('#rows th[data-column="recon_error"][aria-sort="ascending"]').wait_for()
    err = _column(page, "recon_error")
    expected = np.sort(scores.loc[sorted(rarest_rows), "recon_error"].to_numpy())
    assert err == pytest.approx(expected.tolist()) and err != sorted(err, reverse=True)
    page.click('#rows th[data-column="recon_error"]')
    page.locator('#rows th[data-column="recon_error"][aria-sort="descending"]').wait_for()
    assert _column(page, "recon_error") == pytest.approx(expected[::-1].tolist())

    page.select_option("#filter-column", "shape")
    shape = scores.loc[sorted(rarest_rows), "shape"].mode()[0]
    page.fill("#filter", shape)
    want = int((scores.loc[sorted(rarest_rows), "shape"] == shape).sum())
    # Locator waits, not wait_for_function: the pages' Content-Security-Policy forbids evaluating strings as code.
    expect(page.locator("#rows tbody tr")).to_have_count(want)
    cells = page.locator('#rows tbody td[data-column="shape"]').all_text_contents()
    assert cells == [shape] * want

    page.fill("#filter", "")
    page.click('[data-subset="typical"]')
    page.locator('#rows th[data-column="rarity"][aria-sort="ascending"]').wait_for()
    expect(page.locator("#rows tbody tr")).to_have_count(64)
    typical = _column(page, "rarity")
    assert typical[0] == pytest.approx(scores["rarity"].min()) and typical == sorted(typical)

    assert page.locator("#groups svg").count() == 2 * 3  # shape, group, shape x group: weight and rarity
    assert page.locator("#hists svg").count() == 6
    page.screenshot(path=str(ARTIFACTS / "web-audit.png"), full_page=True)
    assert all(url.startswith(open_server) or url.startswith("data:") for url in page.requested)


def test_browser_asks_for_the_api_key_and_keeps_it_in_the_session(page, keyed_server, run):
    page.goto(f"{keyed_server}/")
    form = page.locator("#key-form")
    form.wait_for(state="visible")
    page.fill("#api-key", "wrong-key")
    page.click("#key-form button[type=submit]")
    page.locator("#key-message", has_text="refused").wait_for()
    assert page.locator("#forget-key").is_hidden()  # the refused key is not kept
    page.screenshot(path=str(ARTIFACTS / "web-key.png"))
    page.fill("#api-key", KEY)
    page.click("#key-form button[type=submit]")
    page.locator("#card-body dt", has_text="novelty threshold").wait_for()
    assert form.is_hidden()
    assert page.evaluate("sessionStorage.getItem('debias-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0

    typical = shapes_images(1, seed=5)[0]
    page.set_input_files("#files", [_png_file("shape.png", typical)])
    _check_card(page, run, "shape.png", typical)

    page.goto(f"{keyed_server}/audit")  # same tab: the session keeps the key, no second prompt
    page.locator('#rows th[data-column="rarity"][aria-sort="descending"]').wait_for()
    assert page.locator("#key-form").is_hidden()
    page.click("#forget-key")
    assert page.evaluate("sessionStorage.getItem('debias-api-key')") is None
    page.reload()
    page.locator("#key-form").wait_for(state="visible")  # forgotten: asked again


# -- the command line -----------------------------------------------------------------------------------------------
def test_serve_with_a_missing_audit_dir_is_a_one_line_error(run, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "debias", "serve", "--model", str(run), "--audit", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "no audit there" in proc.stderr and "Traceback" not in proc.stderr


def test_audit_open_serves_the_audit_it_wrote(run, tmp_path):
    out = tmp_path / "audit"
    proc = subprocess.Popen(
        [sys.executable, "-m", "debias", "audit", "--model", str(run), "--data", TINY_SOURCE, "--out", str(out),
         "--group-by", "shape", "--device", "cpu", "--no-report", "--quiet", "--open"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "DISPLAY": ""},
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline, url, seen = time.monotonic() + 120, None, []
        while url is None:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                continue
            match = re.search(r"audit browser at (http://\S+/audit)", seen[-1])
            url = match.group(1) if match else None
        base = url.removesuffix("/audit")
        while True:  # the URL is printed just before uvicorn binds
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            time.sleep(0.2)
        assert "Samples" in httpx.get(url).text
        summary = httpx.get(f"{base}/v1/audit/summary").json()
        assert summary["n_rows"] == 300 and summary["summary"]["source"] == TINY_SOURCE
        assert (out / "browser.json").is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
