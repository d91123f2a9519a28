"""perspicio serve under load, on 127.0.0.1 only: 50 concurrent explain requests from 10 clients
against the real CLI server with a short queue. Every answer is a 200 equal to the Python API's
result or a clean 503 (JSON error, Retry-After); the server's memory comes back near its baseline.
The throughput numbers are in benchmarks/bench_serve.py and docs/benchmarks.md."""

from __future__ import annotations

import base64
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from perspicio.serve.loadtest import explain_load, reference_values, server_rss, start_server  # noqa: E402
from perspicio.zoo import SAMPLES  # noqa: E402

pytestmark = pytest.mark.slow


def test_fifty_requests_from_ten_clients() -> None:
    server = start_server(["--workers", "2", "--queue", "2", "--cache-mb", "0"])
    try:
        pid = server.process.pid
        explain_load(
            server.url, [{"sample": "coffee", "methods": "gradcam", "target": "1"}] * 4, clients=2
        )
        time.sleep(1)
        base = server_rss(pid)
        reqs = [
            {"sample": SAMPLES[i % len(SAMPLES)], "methods": "gradcam", "target": str(i)}
            for i in range(50)
        ]
        res = explain_load(server.url, reqs, clients=10)
        time.sleep(2)
        after = server_rss(pid)
    finally:
        server.stop()
    assert set(res.statuses) <= {200, 503}, res.statuses
    ok = [i for i, s in enumerate(res.statuses) if s == 200]
    busy = [i for i, s in enumerate(res.statuses) if s == 503]
    assert len(ok) >= 4 and busy, (len(ok), len(busy))  # the queue of 2 must have overflowed
    for i in busy:
        assert list(res.bodies[i]) == ["error"] and "busy" in res.bodies[i]["error"]
        assert int(res.retry_after[i]) >= 1
    for i, ref in zip(ok, reference_values([reqs[i] for i in ok])):
        body = res.bodies[i]
        assert body["target"]["index"] == int(reqs[i]["target"])
        m = body["methods"][0]
        got = np.frombuffer(base64.b64decode(m["values"]), "<f4").reshape(m["shape"])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * float(np.abs(ref).max()))
    if base:  # Linux: resident memory of the server and its workers
        assert after < base * 1.15 + 64 * 2**20, (base / 2**20, after / 2**20)
