"""`debias serve` as a real uvicorn server in a subprocess on a free loopback port: many concurrent clients get the
same per-image results as scoring each image alone, bad inputs are refused while the server keeps serving, the API
key from the environment is enforced, and SIGTERM stops it cleanly. Every request loop here is bounded."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from debias.detector import open_detector
from tests.novelty_support import bad_uploads, encode, noise_images, shapes_images, tiny_run

KEY = "live-test-key"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    run = tiny_run(tmp_path_factory.mktemp("live") / "run")
    open_detector(run, progress=False)  # fit novelty.pt here so the server only loads it
    return run


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
    log = tmp_path_factory.mktemp("live-log") / "server.log"
    env = {**os.environ, "DEBIAS_API_KEY": KEY, "DEBIAS_MAX_FILES": "16", "PYTHONUNBUFFERED": "1"}
    for _attempt in range(3):  # the free port can be taken between our probe and the server's bind
        port = free_port()
        with open(log, "w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "debias", "serve", "--model", str(run), "--port", str(port), "--device", "cpu",
                 "--max-batch-size", "32", "--max-wait-ms", "100", "--log-level", "warning"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    yield base, proc
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            proc.kill()
            proc.wait()
            if "address already in use" in log.read_text().lower():
                continue
            pytest.fail(f"server did not become ready:\n{log.read_text()[-3000:]}")
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                pytest.fail("server ignored SIGTERM")
        return
    pytest.fail("no free port after 3 attempts")


def test_concurrent_clients_get_their_own_results(server, run):
    base, _ = server
    rng = np.random.default_rng(7)
    images = np.concatenate([shapes_images(48, seed=3), noise_images(16, seed=4)])
    # 32 clients x 2 requests, each with 1-3 distinct images, in a random order
    requests = []
    order = rng.permutation(len(images))
    pos = 0
    while pos < len(order):
        k = int(rng.integers(1, 4))
        requests.append(order[pos : pos + k].tolist())
        pos += k

    async def client(worker: int, http: httpx.AsyncClient) -> list[tuple[list[int], dict]]:
        got = []
        for idx in requests[worker::32]:
            files = [("files", (f"img{i}.png", encode(images[i]), "image/png")) for i in idx]
            r = await http.post(f"{base}/v1/score", files=files, headers={"X-API-Key": KEY})
            assert r.status_code == 200, r.text
            got.append((idx, r.json()))
        return got

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(client(w, http) for w in range(32)))

    answers = [a for per_client in asyncio.run(main()) for a in per_client]
    assert sum(len(idx) for idx, _ in answers) == len(images)

    det = open_detector(run, progress=False)
    tol = 1 / (det.calibrator.n_calibration_ + 1) + 1e-9
    for idx, body in answers:
        assert [r["filename"] for r in body["results"]] == [f"img{i}.png" for i in idx]  # request order
        for i, res in zip(idx, body["results"]):
            alone = det.score_batch(torch.from_numpy(images[i : i + 1]).permute(0, 3, 1, 2).float() / 255)
            assert res["novelty"] == pytest.approx(alone.novelty[0], rel=1e-4, abs=1e-6), i
            assert abs(res["p_value"] - alone.p_value[0]) <= tol
            assert res["rarity"] == pytest.approx(alone.rarity[0], rel=1e-5, abs=1e-6)

    # the requests really were grouped: fewer model batches than requests
    metrics = httpx.get(f"{base}/metrics").text
    batches = float(re.search(r"^debias_model_batch_size_count (\S+)$", metrics, re.M).group(1))
    images_in_batches = float(re.search(r"^debias_model_batch_size_sum (\S+)$", metrics, re.M).group(1))
    assert images_in_batches >= len(images) and batches < len(requests)


def test_bad_inputs_are_refused_and_the_server_keeps_serving(server):
    base, proc = server
    good = encode(shapes_images(1)[0])
    headers = {"X-API-Key": KEY}
    with httpx.Client(timeout=60) as http:
        for name, (data, fragment) in bad_uploads().items():
            r = http.post(f"{base}/v1/score", files=[("files", (name, data, "application/octet-stream"))],
                          headers=headers)
            assert 400 <= r.status_code < 500 and r.json()["files"][0]["filename"] == name, (name, r.text)
            assert fragment in r.json()["files"][0]["reason"]
        r = http.post(f"{base}/v1/score", files=[("files", (f"{i}.png", good, "image/png")) for i in range(17)],
                      headers=headers)
        assert r.status_code == 413 and r.json()["error"] == "too_many_files"  # DEBIAS_MAX_FILES=16 from the env
        assert http.post(f"{base}/v1/score", files=[("files", ("ok.png", good, "image/png"))],
                         headers=headers).status_code == 200
    assert proc.poll() is None


def test_api_key_from_the_environment(server):
    base, _ = server
    good = [("files", ("ok.png", encode(shapes_images(1)[0]), "image/png"))]
    assert httpx.post(f"{base}/v1/score", files=good).status_code == 401
    assert httpx.post(f"{base}/v1/score", files=good, headers={"X-API-Key": "nope"}).status_code == 401
    assert httpx.get(f"{base}/v1/model", headers={"X-API-Key": KEY}).json()["calibration_size"] == 60
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}


def test_serve_without_a_model_is_a_one_line_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "debias", "serve", "--model", str(tmp_path / "none"), "--port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "no trained model" in proc.stderr and "Traceback" not in proc.stderr


def test_unauthenticated_upload_gets_its_401_before_the_body(server):
    """Headers announcing 60 MB, then a few bytes and silence: the 401 comes from the headers alone, at once, and the
    server closes the connection instead of waiting for (or reading) the rest (issue 14, item 2)."""
    import socket
    from urllib.parse import urlparse

    base, _ = server
    u = urlparse(base)

    def first_reply(extra_header: bytes, length: int = 62914560) -> tuple[bytes, float]:
        with socket.create_connection((u.hostname, u.port), timeout=10) as s:
            s.sendall(
                b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                + extra_header + f"Content-Length: {length}\r\n\r\n--b\r\n".encode()
            )
            t0 = time.monotonic()
            reply = b""
            while b"\r\n\r\n" not in reply:
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
            return reply, time.monotonic() - t0

    reply, took = first_reply(b"")
    assert reply.startswith(b"HTTP/1.1 401") and b"connection: close" in reply.lower() and took < 5
    # with the key, the request gets past the gate to the body limit, which refuses 1 GiB from the headers too
    reply, took = first_reply(f"X-API-Key: {KEY}\r\n".encode(), length=2**30)
    assert reply.startswith(b"HTTP/1.1 413") and took < 5
