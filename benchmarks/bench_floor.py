"""The floor under `POST /v1/tasks?wait`: what any durable HTTP service adds, with no model.

A bare FastAPI app on uvicorn (same stack, same client, same 5-way 1-shot PNG uploads as
bench_service) answers two routes, one request at a time:

- /echo parses the multipart body and reads the five images;
- /durable also does the least a task that survives a crash needs: its rows and images in one
  SQLite transaction (WAL, as the embedded service) and a weights-sized file (a full-mode
  Conv4, ~450 KB) written, fsynced and renamed into a fresh folder, the folders fsynced.

Their p50s, next to bench_service's overhead (HTTP p50 minus in-process adaptation), say how
much of that overhead any design on this machine and disk would pay.

    .venv/bin/python benchmarks/bench_floor.py [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from fastapi import FastAPI, Request

WEIGHTS_BYTES = 450_000


def serve(port: int, folder: Path) -> None:
    """Run the bare app (in the child process)."""
    import uvicorn

    app = FastAPI()
    database = sqlite3.connect(folder / "floor.db", check_same_thread=False)
    database.execute("PRAGMA journal_mode=WAL")
    database.execute("PRAGMA synchronous=NORMAL")
    database.execute("CREATE TABLE examples (task TEXT, position INTEGER, label TEXT, data BLOB)")
    weights = os.urandom(WEIGHTS_BYTES)

    async def images(request: Request) -> tuple[list[bytes], list[str]]:
        form = await request.form()
        files = [await part.read() for part in form.getlist("images") if not isinstance(part, str)]
        return files, [str(label) for label in form.getlist("labels")]

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        files, _ = await images(request)
        return {"images": len(files)}

    @app.post("/durable")
    async def durable(request: Request) -> dict[str, str]:
        files, labels = await images(request)
        task = uuid.uuid4().hex
        with database:
            database.executemany(
                "INSERT INTO examples VALUES (?, ?, ?, ?)",
                [
                    (task, i, label, data)
                    for i, (label, data) in enumerate(zip(labels, files, strict=True))
                ],
            )
        target = folder / "tasks" / task / "weights.safetensors"
        target.parent.mkdir(parents=True)
        tmp = target.with_suffix(".tmp")
        with tmp.open("wb") as handle:
            handle.write(weights)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(target)
        for changed in (target.parent, target.parent.parent):
            descriptor = os.open(changed, os.O_RDONLY | os.O_DIRECTORY)
            os.fsync(descriptor)
            os.close(descriptor)
        return {"id": task}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    """Start the bare app, time both routes in turn, print their p50 and p95."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="per route and round")
    parser.add_argument("--zip", default=None, help="Omniglot zip (default: bench_service's)")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.folder)
        return

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_service

    archive, characters = bench_service.load_characters(args.zip or bench_service.DEFAULT_ZIP)
    rng = random.Random(0)
    episodes = [bench_service.episode(archive, characters, rng, 1)[0] for _ in range(50)]
    port = bench_service.free_port()
    folder = Path(tempfile.mkdtemp(prefix="maml-serve-floor-"))
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), "--folder", str(folder)]
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(url + "/docs", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        timings: dict[str, list[float]] = {"/echo": [], "/durable": []}
        with httpx.Client(base_url=url, timeout=30) as client:
            for _ in range(2):
                for route, times in timings.items():
                    for i in range(args.requests):
                        support = episodes[i % len(episodes)]
                        files = [
                            ("images", (f"{j}.png", data, "image/png"))
                            for j, (data, _) in enumerate(support)
                        ]
                        started = time.perf_counter()
                        response = client.post(
                            route, files=files, data={"labels": [lb for _, lb in support]}
                        )
                        elapsed = time.perf_counter() - started
                        response.raise_for_status()
                        if i >= 5:
                            times.append(elapsed)
    finally:
        server.terminate()
        server.wait(30)
    print(f"bare FastAPI + uvicorn, 5-way 1-shot uploads, {args.requests} requests x 2 rounds")
    print("route        p50 (ms)  p95 (ms)")
    for route, times in timings.items():
        ordered = sorted(times)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        print(f"{route:<12} {statistics.median(times) * 1e3:8.2f}  {p95 * 1e3:8.2f}")


if __name__ == "__main__":
    main()
