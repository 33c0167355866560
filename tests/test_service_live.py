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

from debias.density.detector import open_detector
from tests.novelty_support import (
    bad_uploads,
    encode,
    noise_images,
    shapes_images,
    tiny_run,
)

KEY = "live-test-key"
# Small limits so that the decode budget and the body timeouts can be seen within seconds: one 1024 x 1024 image may
# decode at a time, a request waits 50 ms for room; a body may pause 2 s and take 4 s in all.
BIG_SIDE = 1024
LIMITS = {"DEBIAS_MAX_PIXELS": str(BIG_SIDE * BIG_SIDE), "DEBIAS_MAX_DECODE_PIXELS": str(BIG_SIDE * BIG_SIDE),
          "DEBIAS_DECODE_WAIT_S": "0.05", "DEBIAS_BODY_IDLE_TIMEOUT_S": "2", "DEBIAS_BODY_TIMEOUT_S": "4"}


def stop(proc: subprocess.Popen, what: str, timeout: float = 20) -> None:
    """SIGTERM, then fail the test (after a kill) if the server does not exit within ``timeout`` seconds."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{what} ignored SIGTERM")


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
    env = {**os.environ, "DEBIAS_API_KEY": KEY, "DEBIAS_MAX_FILES": "16", "PYTHONUNBUFFERED": "1", **LIMITS}
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
            stop(proc, "server")
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
        for name, (data, fragment, status) in bad_uploads().items():
            r = http.post(f"{base}/v1/score", files=[("files", (name, data, "application/octet-stream"))],
                          headers=headers)
            assert r.status_code == status and r.json()["files"][0]["filename"] == name, (name, r.text)
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


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's RSS from /proc")
def test_decode_budget_bounds_concurrent_decoding(server):
    """Issue 14, item 1: 8 concurrent requests of 4 large PNGs each. The pixels decoding at once never exceed the
    budget (one image here); requests that find no room within the wait get 503 with Retry-After; the rest are
    scored; memory comes back afterwards and the server keeps serving."""
    base, proc = server
    headers = {"X-API-Key": KEY}
    rng = np.random.default_rng(0)
    big = encode(rng.integers(0, 256, (BIG_SIDE, BIG_SIDE, 3), dtype=np.uint8))
    small = encode(shapes_images(1)[0])
    assert httpx.post(f"{base}/v1/score", files=[("files", ("s.png", small, "image/png"))], headers=headers,
                      timeout=60).status_code == 200
    baseline = _rss_mb(proc.pid)

    async def client(http: httpx.AsyncClient, k: int) -> httpx.Response:
        files = [("files", (f"big{k}_{j}.png", big, "image/png")) for j in range(4)]
        return await http.post(f"{base}/v1/score", files=files, headers=headers)

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(client(http, k) for k in range(8)))

    answers = asyncio.run(main())
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {200, 503} and 200 in codes and 503 in codes, codes
    for r in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["error"] == "busy", r.text
        else:
            assert r.json()["n_scored"] == 4
    metrics = httpx.get(f"{base}/metrics").text
    peak = float(re.search(r"^debias_decode_pixels_peak (\S+)$", metrics, re.M).group(1))
    assert peak == BIG_SIDE * BIG_SIDE  # one image at a time, never more
    assert float(re.search(r"^debias_decode_busy_total (\S+)$", metrics, re.M).group(1)) == codes.count(503)
    assert float(re.search(r"^debias_decode_pixels (\S+)$", metrics, re.M).group(1)) == 0
    assert _rss_mb(proc.pid) < baseline + 200, (baseline, _rss_mb(proc.pid))
    assert httpx.post(f"{base}/v1/score", files=[("files", ("s.png", small, "image/png"))], headers=headers,
                      timeout=60).status_code == 200


def test_slow_bodies_get_408_and_are_closed(server):
    """Issue 14, item 2: a client that sends its headers and part of the body, then nothing, gets 408 after the idle
    timeout (2 s here) and the connection is closed; one that trickles a byte every half second is cut off at the
    total timeout (4 s). 20 such clients at once are all answered, and the server keeps serving."""
    from urllib.parse import urlparse

    base, _ = server
    u = urlparse(base)
    head = (b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + f"X-API-Key: {KEY}\r\nContent-Length: 100000\r\n\r\n--b\r\n".encode())

    def read_all(s: socket.socket) -> bytes:
        reply = b""
        while True:
            try:
                chunk = s.recv(4096)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:  # closed by the server
                break
            reply += chunk
        return reply

    socks = [socket.create_connection((u.hostname, u.port), timeout=15) for _ in range(20)]
    t0 = time.monotonic()
    for s in socks:
        s.sendall(head)
    replies = [read_all(s) for s in socks]
    took = time.monotonic() - t0
    for s in socks:
        s.close()
    assert all(r.startswith(b"HTTP/1.1 408") and b"body_timeout" in r for r in replies), replies[0][:300]
    assert took < 2 + 6, took  # the idle timeout plus slack, not the 15 s socket timeout

    with socket.create_connection((u.hostname, u.port), timeout=15) as s:
        s.sendall(head)
        t0 = time.monotonic()
        s.settimeout(0.5)
        reply = b""
        while time.monotonic() - t0 < 12 and not reply:
            try:
                s.sendall(b"x")
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                reply = s.recv(4096)
            except socket.timeout:
                continue
        took = time.monotonic() - t0
        # the headers and the body may arrive in separate segments: read on until the server closes (bounded)
        s.settimeout(2.0)
        while reply and b"not complete after" not in reply:
            try:
                more = s.recv(4096)
            except (socket.timeout, ConnectionResetError):
                break
            if not more:
                break
            reply += more
    assert reply.startswith(b"HTTP/1.1 408") and b"not complete after 4 s" in reply, reply[:300]
    assert 3 < took < 8, took
    good = [("files", ("ok.png", encode(shapes_images(1)[0]), "image/png"))]
    assert httpx.post(f"{base}/v1/score", files=good, headers={"X-API-Key": KEY}).status_code == 200


def test_workers_serve_one_port_from_several_processes(run, tmp_path):
    """Issue 17: `debias serve --workers 2` answers on one port from two model-owning processes, each with the same
    per-image results as scoring alone; SIGTERM stops them all."""
    port = free_port()
    log = tmp_path / "workers.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "debias", "serve", "--model", str(run), "--port", str(port), "--device", "cpu",
             "--workers", "2", "--log-level", "warning"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        pids: set[str] = set()
        deadline = time.monotonic() + 120
        images = shapes_images(4)
        det = open_detector(run, progress=False)
        alone = det.score_batch(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        while time.monotonic() < deadline and len(pids) < 2 and proc.poll() is None:
            try:
                # a new connection each time: the kernel hands connections to the workers in turn
                r = httpx.get(f"{base}/metrics", timeout=5)
                if r.status_code == 200:
                    pids |= set(re.findall(r'debias_worker\{process_id="(\d+)"\}', r.text))
                    files = [("files", (f"{i}.png", encode(img, "PNG"), "image/png")) for i, img in enumerate(images)]
                    scored = httpx.post(f"{base}/v1/score", files=files, timeout=30)
                    if scored.status_code == 503:  # this worker is still loading its model
                        time.sleep(0.2)
                        continue
                    assert scored.status_code == 200, scored.text
                    res = scored.json()["results"]
                    np.testing.assert_allclose([x["novelty"] for x in res], alone.novelty, rtol=1e-4, atol=1e-6)
            except httpx.TransportError:
                time.sleep(0.2)
        assert len(pids) == 2, log.read_text()[-2000:]
    finally:
        stop(proc, "workers", timeout=30)
