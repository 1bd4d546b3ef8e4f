"""Benchmark: ``carclf serve`` under load from a separate process on loopback.

    flock /tmp/carclf-bench.lock python benchmarks/serve_load.py EXPORT_OR_RUN [--requests 2000] [--concurrency 16]
        [--precision fp32|bf16|int8] [--max-batch 8] [--max-wait-ms 5]

Starts ``carclf serve`` on a free 127.0.0.1 port in its own process, waits for /readyz, then sends ``--requests``
POST /v1/predict requests (one real cars196 photo each, drawn from fold 0's out-of-fold photos) from
``--concurrency`` concurrent httpx connections in this process. Prints throughput, p50/p95/p99 latency, errors, the
server's resident memory before and after, and its micro-batch sizes from /metrics; stops the server at the end.
The load stays on loopback, is bounded in count, and the script stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from carclf.errors import CarclfError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for tests/serving.py
from tests.serving import wait_until_ready  # noqa: E402 - a helper of the tests, not of the package

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUN = ROOT / "benchmarks" / "out" / "cpu-lite0-bench-20261123-130103"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def photos(run_dir: Path, n: int) -> list[tuple[str, bytes]]:
    from carclf.artifacts.run import RunDir
    from carclf.export.photos import oof_photos

    found = oof_photos(RunDir.open(run_dir), 0, n).paths
    if not found:
        sys.exit(f"no photos of {run_dir} on disk (data.root)")
    return [(p.name, p.read_bytes()) for p in found]


async def load(url: str, items: list[tuple[str, bytes]], n: int, concurrency: int) -> tuple[list[float], list[str]]:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(n))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                name, data = items[i % len(items)]
                t = time.perf_counter()
                try:
                    r = await client.post("/v1/predict", files=[("file", (name, data, "image/jpeg"))])
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as exc:
                    errors.append(repr(exc))
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def batch_sizes(metrics: str) -> tuple[float, float]:
    count = float(re.search(r"^carclf_batch_size_count (\S+)", metrics, re.M).group(1))
    total = float(re.search(r"^carclf_batch_size_sum (\S+)", metrics, re.M).group(1))
    return count, total


def main() -> None:
    import httpx

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="export folder (or run directory) to serve")
    ap.add_argument("--photos-from", default=str(DEFAULT_RUN), help="run whose fold-0 OOF photos are sent")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--precision", choices=["fp32", "bf16", "int8"],
                    help="serve the export at this precision (default: the one it chose)")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "out" / "serve_load.json"))
    args = ap.parse_args()
    if not 1 <= args.requests <= 20_000 or not 1 <= args.concurrency <= 256:
        sys.exit("--requests must be in 1..20000 and --concurrency in 1..256 (a bounded load)")

    items = photos(Path(args.photos_from), 256)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "carclf", "serve", args.source, "--port", str(port), "--max-batch",
           str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    cmd += ["--precision", args.precision] if args.precision else []
    log = Path(args.out).with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        server = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:
        try:
            wait_until_ready(url, server, 300)
        except CarclfError as exc:
            sys.exit(f"{exc}; see {log}")
        asyncio.run(load(url, items, 32, min(args.concurrency, 8)))  # warm-up: buffers, connections
        rss_before = rss_mb(server.pid)
        b0 = batch_sizes(httpx.get(f"{url}/metrics").text)
        cpu0, client0 = cpu_seconds(server.pid), time.process_time()
        t = time.perf_counter()
        latencies, errors = asyncio.run(load(url, items, args.requests, args.concurrency))
        wall = time.perf_counter() - t
        cpu1, client1 = cpu_seconds(server.pid), time.process_time()
        rss_after = rss_mb(server.pid)
        b1 = batch_sizes(httpx.get(f"{url}/metrics").text)
        model = httpx.get(f"{url}/v1/model").json()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    lat = np.array(latencies) * 1000
    batches = b1[0] - b0[0]
    result = {
        "source": args.source, "engine": model["engine"], "precision": model["precision"], "views": model["views"],
        "requests": args.requests, "concurrency": args.concurrency, "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms, "seconds": wall, "requests_per_s": args.requests / wall,
        "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)), "max_ms": float(lat.max()), "errors": len(errors),
        "rss_mb_before": rss_before, "rss_mb_after": rss_after,
        "mean_batch": (b1[1] - b0[1]) / batches if batches else 0.0, "batches": int(batches),
        # CPU time per request: where the 2 cores went (the load generator shares them with the service)
        "server_cpu_ms_per_request": (cpu1 - cpu0) / args.requests * 1000,
        "client_cpu_ms_per_request": (client1 - client0) / args.requests * 1000,
        "cores": os.cpu_count(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if errors:
        print("first errors:", *errors[:5], sep="\n  ")


if __name__ == "__main__":
    main()
