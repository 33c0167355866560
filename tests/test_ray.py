"""`--engine ray` on a local Ray with 2 CPUs (one Ray start for the module): the Ray Data audit gives the local engine's
columns, skipped files and rarity/weight; Ray Serve answers /v1/score over HTTP like the library and batches a burst."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from debias.density.detector import open_detector  # noqa: E402
from debias.pipelines.audit import AuditJob, run_audit  # noqa: E402
from debias.pipelines.ray_audit import RayAuditOptions, run_ray_audit  # noqa: E402
from tests.novelty_support import encode, noise_images, shapes_images, tiny_run  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tiny_run(tmp_path_factory.mktemp("ray") / "run")
    open_detector(run, progress=False)  # novelty.pt, fitted once, for the serve test
    return run


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """40 PNGs in two label folders, plus a corrupt and an empty file that both engines must skip alike."""
    root = tmp_path_factory.mktemp("ray-images")
    imgs = np.concatenate([shapes_images(30), noise_images(10)])
    for i, arr in enumerate(imgs):
        sub = root / ("shape" if i < 30 else "noise")
        sub.mkdir(exist_ok=True)
        (sub / f"{i:03d}.png").write_bytes(encode(arr))
    (root / "shape" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "noise" / "empty.png").write_bytes(b"")
    return root


def audit_both(run: Path, data: str, out: Path, **job_args) -> tuple:
    # Both engines at the defaults: the run's contrastive encoder is knn-recon's third term (the actors run it too)
    local = run_audit(AuditJob(model=run, data=data, out=out / "local", device="cpu", progress=False, **job_args))
    remote = run_ray_audit(
        AuditJob(model=run, data=data, out=out / "ray", device="cpu", progress=False, **job_args),
        RayAuditOptions(actors=2),
    )
    return local, remote


@pytest.fixture
def fp32():
    """--precision fp32 for the test: the actors must take the driver's setting (bf16 rounding would otherwise hide
    whether both engines compute the same thing)."""
    from debias.runtime.device import precision_setting, set_precision

    before = precision_setting()
    set_precision("fp32")
    yield
    set_precision(before)


def test_ray_audit_matches_the_local_engine(local_ray, run, tmp_path, fp32):
    local, remote = audit_both(run, "builtin:shapes?n=300", tmp_path, group_by=["rare"], report=False)
    a, b = local.scores, remote.scores
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 300
    terms = ["rarity", "rarity_latent", "rarity_reconstruction", "rarity_embedding"]
    numeric = ["weight", "recon_error", "rarity_rank", *terms]
    pd.testing.assert_frame_equal(a.drop(columns=numeric), b.drop(columns=numeric))
    # At fp32 the engines' encodings agree to ~1e-6; the default rarity (robust z-scores of log kNN distances and log
    # reconstruction errors, of order 1) carries that rounding to ~3e-5.
    assert b["rarity_embedding"].std() > 0  # the encoder's term is there, not a constant
    for col in terms:
        np.testing.assert_allclose(b[col], a[col], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(b["weight"], a["weight"], rtol=1e-3, atol=1e-12)
    np.testing.assert_allclose(b["recon_error"], a["recon_error"], rtol=1e-4)
    assert b["weight"].sum() == pytest.approx(1.0)
    # the written files agree too
    pq = pd.read_parquet(tmp_path / "ray" / "scores.parquet")
    assert list(pq.columns) == list(a.columns)
    assert remote.summary["fingerprint"] == local.summary["fingerprint"]
    assert remote.summary["engine"]["name"] == "ray" and remote.summary["engine"]["actors"] == 2
    assert remote.summary["contrastive_encoder"] == local.summary["contrastive_encoder"] is not None
    assert remote.summary["effective_sample_size"] == pytest.approx(local.summary["effective_sample_size"], rel=1e-4)


def test_ray_audit_skips_unreadable_files_like_the_local_engine(local_ray, run, folder, tmp_path, fp32):
    local, remote = audit_both(run, str(folder), tmp_path, report=True)
    assert local.summary["n_skipped"] == remote.summary["n_skipped"] == 2
    assert remote.summary["skipped"] == local.summary["skipped"]
    assert list(remote.scores["path"]) == list(local.scores["path"]) and len(remote.scores) == 40
    np.testing.assert_allclose(remote.scores["rarity"], local.scores["rarity"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(remote.scores["weight"], local.scores["weight"], rtol=1e-3, atol=1e-12)
    assert (tmp_path / "ray" / "report.html").stat().st_size > 10_000  # report pixels decoded again on the driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch_sizes(metrics_text: str) -> tuple[float, float]:
    count = float(re.search(r"^debias_model_batch_size_count (\S+)$", metrics_text, re.M).group(1))
    total = float(re.search(r"^debias_model_batch_size_sum (\S+)$", metrics_text, re.M).group(1))
    return count, total


def test_ray_serve_scores_like_the_library_and_batches_a_burst(local_ray, run):
    from debias.service.ray_serve import build
    from debias.service.settings import Settings

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = Settings(model_dir=run, device="cpu", max_batch_size=32, max_wait_ms=200)
    serve.run(build(settings, replicas=1), name="debias", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the Serve replica did not become ready"
        time.sleep(0.2)

    imgs = np.concatenate([shapes_images(3), noise_images(1)])
    files = [("files", (f"img{i}.png", encode(a), "image/png")) for i, a in enumerate(imgs)]
    r = httpx.post(f"{base}/v1/score", files=files, timeout=60)
    assert r.status_code == 200, r.text
    import torch

    ref = open_detector(run, progress=False).score_batch(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255)
    body = r.json()["results"]
    assert [x["filename"] for x in body] == [f"img{i}.png" for i in range(4)]
    for i, res in enumerate(body):
        assert res["novelty"] == pytest.approx(ref.novelty[i], rel=1e-4, abs=1e-6)
        assert res["rarity"] == pytest.approx(ref.rarity[i], rel=1e-5)
    assert body[3]["is_novel"]  # noise

    # bad input still gets the app's own 4xx through Serve
    bad = httpx.post(f"{base}/v1/score", files=[("files", ("x.png", b"not an image", "image/png"))], timeout=60)
    assert bad.status_code == 415 and bad.json()["files"][0]["filename"] == "x.png"

    before = _batch_sizes(httpx.get(f"{base}/metrics", timeout=10).text)

    async def burst() -> list[int]:
        one = encode(shapes_images(1)[0])
        async with httpx.AsyncClient(timeout=60) as client:
            rs = await asyncio.gather(*[
                client.post(f"{base}/v1/score", files=[("files", (f"b{i}.png", one, "image/png"))]) for i in range(16)
            ])
        return [x.status_code for x in rs]

    assert asyncio.run(burst()) == [200] * 16
    count, total = (a - b for a, b in zip(_batch_sizes(httpx.get(f"{base}/metrics", timeout=10).text), before))
    assert total == 16 and count < 16, f"16 one-image requests ran as {count:.0f} model batches"
    serve.delete("debias")
