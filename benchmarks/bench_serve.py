"""Load benchmark of `perspicio serve` on 127.0.0.1: N explain requests from C concurrent clients.

Starts the real CLI server (default workers: one per core; result cache off so every request is
computed), warms it up, then sends N distinct gradcam requests (6 samples x N targets) from C client
threads. Checks every answer is 200 or a clean 503 and every 200 equals the Python API's result, and
measures the server's resident memory (server + workers) before and after.

    python benchmarks/bench_serve.py [--requests 50] [--clients 10] [--queue 64]
"""

from __future__ import annotations

import argparse
import base64
import time

import numpy as np

from perspicio.serve.loadtest import explain_load, reference_values, server_rss, start_server
from perspicio.zoo import SAMPLES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--queue", type=int, default=64)
    ap.add_argument("--method", default="gradcam")
    args = ap.parse_args()
    server = start_server(["--queue", str(args.queue), "--cache-mb", "0"])
    try:
        pid = server.process.pid
        warm = [
            {"sample": s, "methods": args.method, "target": str(900 + i)}
            for i, s in enumerate(SAMPLES)
        ]
        explain_load(server.url, warm, clients=2)
        time.sleep(2)
        base = server_rss(pid)
        reqs = [
            {"sample": SAMPLES[i % len(SAMPLES)], "methods": args.method, "target": str(i)}
            for i in range(args.requests)
        ]
        res = explain_load(server.url, reqs, clients=args.clients)
        after = server_rss(pid)
        time.sleep(5)
        settled = server_rss(pid)
    finally:
        server.stop()
    ok = [i for i, s in enumerate(res.statuses) if s == 200]
    busy = [i for i, s in enumerate(res.statuses) if s == 503]
    other = [(i, s) for i, s in enumerate(res.statuses) if s not in (200, 503)]
    refs = reference_values([reqs[i] for i in ok])
    worst = 0.0
    for i, ref in zip(ok, refs):
        m = res.bodies[i]["methods"][0]
        got = np.frombuffer(base64.b64decode(m["values"]), "<f4").reshape(m["shape"])
        worst = max(worst, float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-12)))
    print(
        f"{args.requests} requests ({args.method}), {args.clients} clients: {len(ok)} x 200, {len(busy)} x 503, "
        f"other {other}"
    )
    print(f"wall {res.wall:.1f} s -> {len(ok) / res.wall:.2f} req/s (200s)")
    print(
        f"latency of 200s: p50 {res.percentile(50):.2f} s, p90 {res.percentile(90):.2f} s, p99 {res.percentile(99):.2f} s, max {res.percentile(100):.2f} s"
    )
    print(f"largest difference to the Python API, relative to the map's max: {worst:.2e}")
    mib = 2**20
    print(
        f"server + workers RSS: before {base / mib:.0f} MiB, right after {after / mib:.0f} MiB, "
        f"5 s later {settled / mib:.0f} MiB"
    )


if __name__ == "__main__":
    main()
