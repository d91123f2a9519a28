"""Concurrent clients against a running ``perspicio serve`` (the load test and its benchmark).

:func:`start_server` runs ``perspicio serve`` (through ``sys.executable``) as a child process on 127.0.0.1 and
waits until its workers answer; :func:`explain_load` sends explain requests from several client
threads and records every status, latency and result; :func:`server_rss` sums the resident memory of
the server and its worker processes (Linux ``/proc``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    """A ``perspicio serve`` child process."""

    process: subprocess.Popen
    url: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)


def start_server(args: Sequence[str] = (), *, timeout: float = 300.0) -> Server:
    """Start ``perspicio serve --port <free> *args`` and wait until ``/api/predict`` answers."""
    import httpx

    port = free_port()
    launcher = "import sys; from perspicio.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", launcher, "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"perspicio serve exited with status {proc.returncode}")
        try:
            if (
                httpx.post(
                    f"{url}/api/predict", data={"sample": "chelsea"}, timeout=timeout
                ).status_code
                == 200
            ):
                return Server(proc, url)
        except httpx.HTTPError:
            pass
        if time.monotonic() > end:
            proc.kill()
            raise RuntimeError("perspicio serve did not answer in time")
        time.sleep(0.5)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def server_rss(pid: int) -> int:
    """Resident bytes of process ``pid`` and all its descendants (0 where /proc is unavailable)."""
    total = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += _children(p)
    return total


@dataclass
class LoadResult:
    """Every request of a load run: status, seconds, and the JSON of each 200."""

    statuses: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    retry_after: list[str | None] = field(default_factory=list)
    wall: float = 0.0

    def percentile(self, q: float, status: int = 200) -> float:
        import numpy as np

        vals = [s for s, st in zip(self.seconds, self.statuses) if st == status]
        return float(np.percentile(vals, q)) if vals else float("nan")


def explain_load(
    url: str, requests: Sequence[dict[str, Any]], clients: int = 10, timeout: float = 900.0
) -> LoadResult:
    """Send ``requests`` (form dicts for ``/api/explain``) from ``clients`` threads, each with its own
    connection, all started together; returns every answer in request order."""
    import httpx

    res = LoadResult(
        statuses=[0] * len(requests),
        seconds=[0.0] * len(requests),
        bodies=[{}] * len(requests),
        requests=list(requests),
        retry_after=[None] * len(requests),
    )
    next_index = iter(range(len(requests)))
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client() -> None:
        with httpx.Client(timeout=timeout) as http:
            start.wait()
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                t0 = time.perf_counter()
                r = http.post(f"{url}/api/explain", data=requests[i])
                res.seconds[i] = time.perf_counter() - t0
                res.statuses[i] = r.status_code
                res.bodies[i] = r.json()
                res.retry_after[i] = r.headers.get("retry-after")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res.wall = time.perf_counter() - t0
    return res


def reference_values(requests: Sequence[dict[str, Any]]) -> list[Any]:
    """The Python API's channel-summed map for each request (bundled model, sample, method, target)."""
    import perspicio
    from perspicio import zoo

    zm = zoo.load("efficientnet_lite0")
    out = []
    for req in requests:
        x = zm.preprocess(zoo.sample(req["sample"]))
        e = perspicio.explain(zm, x, method=req["methods"], target=int(req["target"]))
        out.append(e.attributions[0].sum(0).numpy())
    return out
