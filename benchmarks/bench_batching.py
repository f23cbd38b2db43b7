"""Batching across requests, over HTTP: each figure against its unbatched baseline in the same run.

predict: one PostgreSQL + Redis stack with two API processes on the same database, one with
prediction batching off (MAML_SERVE_PREDICT_BATCH_MAX_IMAGES=0) and one with it on; `--clients`
threads each POST `--batch`-image predictions to their own task, for `--seconds`, alternating
between the two APIs for `--rounds` rounds; images/s and p50 latency.

adapt: the same stack with `--workers` Celery workers (solo pool) started with adapt batching off
(MAML_SERVE_ADAPT_BATCH_MAX_JOBS=1) and then on (32); `--clients` threads each POST 5-way
1-shot tasks with ?wait in a loop, in full and head mode; tasks/s and p50 latency.

    .venv/bin/python -m benchmarks.bench_batching [--what predict,adapt,scale] [--seconds 15]

scale: predict plus a third API started with two processes (batching on), same database.
drain: workers (batching off, then on) drain `--line` queued adapt jobs; jobs/s from the jobs
table (first start to last end), full and head mode.
overload: with no worker, a tenant fills its backlog bound (8) and sends `--refusals` more;
their status codes and latency.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from benchmarks.episodes import Episodes, Files
from benchmarks.stack import ROOT, Stack, free_port, running_stack


@dataclass
class Load:
    """What a closed-loop load of N clients did in a time window."""

    done: int
    units: int
    seconds: float
    latencies: list[float]
    errors: dict[str, int]

    @property
    def rate(self) -> float:
        """Units (images or tasks) per second."""
        return self.units / self.seconds

    @property
    def p50_ms(self) -> float:
        """Median request latency in ms."""
        return 1e3 * statistics.median(self.latencies) if self.latencies else float("nan")


def closed_loop(
    clients: int, seconds: float, request: Callable[[httpx.Client, int], int], url: str, key: str
) -> Load:
    """`clients` threads each sending `request` back to back for `seconds`; units it returned."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    totals = [0, 0]
    start = threading.Barrier(clients + 1)

    def client_loop(index: int) -> None:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as client:
            start.wait()
            while time.monotonic() < stop:
                began = time.perf_counter()
                try:
                    units = request(client, index)
                except httpx.HTTPStatusError as exc:
                    with lock:
                        name = str(exc.response.status_code)
                        errors[name] = errors.get(name, 0) + 1
                    continue
                except httpx.HTTPError as exc:
                    with lock:
                        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                elapsed = time.perf_counter() - began
                with lock:
                    totals[0] += 1
                    totals[1] += units
                    latencies.append(elapsed)

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.monotonic()
    for thread in threads:
        thread.join()
    return Load(totals[0], totals[1], time.monotonic() - began, latencies, errors)


def _ready_tasks(url: str, key: str, episodes: Episodes, count: int, mode: str) -> list[str]:
    ids = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as client:
        for _ in range(count):
            files, data = episodes.support(mode)
            response = client.post("/v1/tasks?wait=60", files=files, data=data, timeout=90)
            response.raise_for_status()
            ids.append(response.json()["id"])
    return ids


def _second_api(
    stack: Stack, settings: dict[str, str], processes: int = 1
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**stack.env, **settings}
    process = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning",
         "--workers", str(processes)],
        env=env,
        cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the second API did not become ready")


def bench_predict(
    args: argparse.Namespace, episodes: Episodes, scale: bool = False
) -> list[dict[str, Any]]:
    """Images/s with and without prediction batching, alternating between APIs on one database.

    With `scale`, a third API of two processes (batching on) is measured too.
    """
    # Up to four API processes and a worker share one PostgreSQL (max_connections 100 by
    # default): each keeps at most 16 connections, so none is refused one.
    off = {"MAML_SERVE_PREDICT_BATCH_MAX_IMAGES": "0", "MAML_SERVE_DB_POOL_SIZE": "16"}
    with running_stack(off, celery=True, workers=1) as stack, ExitStack() as cleanup:
        urls = {"unbatched": stack.url}
        others = [("batched", 1)] + ([("batched, 2 API processes", 2)] if scale else [])
        for name, processes in others:
            process, urls[name] = _second_api(stack, {}, processes)
            cleanup.callback(process.wait, 20)
            cleanup.callback(process.terminate)
        tasks = _ready_tasks(stack.url, stack.key, episodes, args.clients, args.mode)
        rows: list[dict[str, Any]] = []
        for batch in args.batch:
            queries = [episodes.queries(batch) for _ in range(args.clients)]

            def predict(
                client: httpx.Client, index: int, queries: list[Files] = queries, batch: int = batch
            ) -> int:
                response = client.post(
                    f"/v1/tasks/{tasks[index]}/predictions", files=queries[index]
                )
                response.raise_for_status()
                return batch

            for url in urls.values():  # warm-up: models cached, code paths hot
                closed_loop(args.clients, 2, predict, url, stack.key)
            results: dict[str, list[Load]] = {name: [] for name in urls}
            for _ in range(args.rounds):
                for name, url in urls.items():
                    results[name].append(
                        closed_loop(args.clients, args.seconds, predict, url, stack.key)
                    )
            for name, loads in results.items():
                rows.append({**_summary(name, loads), "batch": batch})
    return rows


def bench_adapt(args: argparse.Namespace, episodes: Episodes) -> list[dict[str, Any]]:
    """Tasks/s with adapt batching off and on, full and head mode, through Celery workers."""
    rows: list[dict[str, Any]] = []
    for max_jobs in ("1", "32"):
        settings = {"MAML_SERVE_ADAPT_BATCH_MAX_JOBS": max_jobs}
        with running_stack(
            settings, celery=True, workers=args.workers, api_processes=args.api_processes
        ) as stack:
            for mode in ("full", "head"):
                supports = [episodes.support(mode) for _ in range(64)]

                def create(client: httpx.Client, index: int, supports: Any = supports) -> int:
                    files, data = supports[(index * 7 + int(time.monotonic() * 1000)) % 64]
                    response = client.post("/v1/tasks?wait=60", files=files, data=data)
                    response.raise_for_status()
                    if response.status_code != 201:
                        raise httpx.HTTPStatusError(
                            "not ready", request=response.request, response=response
                        )
                    return 1

                closed_loop(args.clients, 2, create, stack.url, stack.key)
                before = _cpu(stack)
                load = closed_loop(args.clients, args.seconds, create, stack.url, stack.key)
                after = _cpu(stack)
                name = f"{mode}, adapt_batch_max_jobs={max_jobs}"
                row = _summary(name, [load])
                tasks = max(load.units, 1)
                row["api_cpu_ms"] = 1e3 * (after[0] - before[0]) / tasks
                row["worker_cpu_ms"] = 1e3 * (after[1] - before[1]) / tasks
                rows.append(row)
    return rows


def _cpu(stack: Stack) -> tuple[float, float]:
    """CPU seconds used so far by the API processes and by the workers (with their children)."""
    from benchmarks.bench_service import cpu_seconds

    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue

    def tree(pid: int) -> float:
        kids = [child for child, parent in parents.items() if parent == pid]
        return cpu_seconds(pid) + sum(tree(kid) for kid in kids)

    return tree(stack.api.pid), sum(tree(worker.pid) for worker in stack.workers)


def bench_drain(args: argparse.Namespace, episodes: Episodes) -> list[dict[str, Any]]:
    """Jobs/s of workers draining a line of `--line` queued adapt jobs, batching off and on.

    The workers are stopped, the tasks posted (no wait), new workers started; the rate is the
    line over the span from the first job's start to the last job's end (from the jobs table),
    so worker start-up is not counted.
    """
    from sqlalchemy import create_engine, text

    from benchmarks.stack import start_worker

    rows: list[dict[str, Any]] = []
    for max_jobs in ("1", "32"):
        settings = {"MAML_SERVE_ADAPT_BATCH_MAX_JOBS": max_jobs}
        with running_stack(settings, celery=True, workers=args.workers) as stack:
            engine = create_engine(stack.env["MAML_SERVE_DATABASE_URL"])
            headers = {"Authorization": f"Bearer {stack.key}"}
            for mode in ("full", "head"):
                for worker in stack.workers:
                    worker.terminate()
                    worker.wait(30)
                with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as client:
                    ids = []
                    for _ in range(args.line):
                        files, data = episodes.support(mode)
                        response = client.post("/v1/tasks", files=files, data=data)
                        response.raise_for_status()
                        ids.append(response.json()["job"]["id"])
                stack.workers[:] = [start_worker(stack.env, i) for i in range(args.workers)]
                query = text(
                    "SELECT count(*) FILTER (WHERE state IN ('succeeded', 'failed')), "
                    "count(*) FILTER (WHERE state = 'failed'), "
                    "extract(epoch FROM max(finished_at) - min(started_at)) "
                    "FROM jobs WHERE id = ANY(CAST(:ids AS uuid[]))"
                )
                deadline = time.monotonic() + 600
                while time.monotonic() < deadline:
                    with engine.connect() as connection:
                        ended, failed, span = connection.execute(query, {"ids": ids}).one()
                    if ended == len(ids):
                        break
                    time.sleep(0.5)
                rows.append(
                    {
                        "name": f"{mode}, adapt_batch_max_jobs={max_jobs}",
                        "rate": len(ids) / float(span),
                        "failed": failed,
                    }
                )
            engine.dispose()
    return rows


def bench_overload(args: argparse.Namespace, episodes: Episodes) -> dict[str, Any]:
    """Status codes and latency of POST /v1/tasks past the backlog bound (no worker consumes)."""
    bound = 8
    settings = {
        "MAML_SERVE_MAX_QUEUED_ADAPTATIONS_PER_TENANT": str(bound),
        "MAML_SERVE_MAX_QUEUED_ADAPTATIONS": str(4 * bound),
    }
    codes: dict[int, int] = {}
    refused: list[float] = []
    with running_stack(settings, celery=True, workers=0) as stack:
        headers = {"Authorization": f"Bearer {stack.key}"}
        with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as client:
            for index in range(bound + args.refusals):
                files, data = episodes.support("full")
                began = time.perf_counter()
                response = client.post("/v1/tasks", files=files, data=data)
                elapsed = time.perf_counter() - began
                codes[response.status_code] = codes.get(response.status_code, 0) + 1
                if index >= bound:
                    assert response.headers.get("retry-after"), response.text
                    refused.append(elapsed)
    refused.sort()
    return {
        "codes": codes,
        "p50_ms": 1e3 * refused[len(refused) // 2],
        "p99_ms": 1e3 * refused[min(len(refused) - 1, int(0.99 * len(refused)))],
    }


def _summary(name: str, loads: list[Load]) -> dict[str, Any]:
    units = sum(load.units for load in loads)
    seconds = sum(load.seconds for load in loads)
    latencies = [x for load in loads for x in load.latencies]
    errors: dict[str, int] = {}
    for load in loads:
        for code, count in load.errors.items():
            errors[code] = errors.get(code, 0) + count
    return {
        "name": name,
        "rate": units / seconds,
        "p50_ms": 1e3 * statistics.median(latencies) if latencies else float("nan"),
        "errors": errors,
    }


def main() -> None:
    """Run the chosen measurements and print Markdown tables with same-run ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", default="predict,adapt")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rounds", type=int, default=2, help="alternations (predict)")
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[32], help="images per prediction request"
    )
    parser.add_argument("--mode", default="full", help="task mode for the prediction tasks")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes (adapt)")
    parser.add_argument("--api-processes", type=int, default=1, help="API processes (adapt)")
    parser.add_argument("--line", type=int, default=256, help="queued jobs to drain (drain)")
    parser.add_argument("--refusals", type=int, default=100, help="requests past the bound")
    args = parser.parse_args()
    episodes = Episodes()
    what = set(args.what.split(","))
    if "predict" in what or "scale" in what:
        rows = bench_predict(args, episodes, scale="scale" in what)
        print(f"\nPredictions, {args.clients} clients, {args.mode} models, one task each:\n")
        print("| images per request | path | images/s | p50 ms | vs unbatched | errors |")
        print("|---|---|---|---|---|---|")
        for row in rows:
            base = next(r["rate"] for r in rows if r["batch"] == row["batch"])
            print(f"| {row['batch']} | {row['name']} | {row['rate']:.0f} | {row['p50_ms']:.0f} | "
                  f"{row['rate'] / base:.2f}x | {row['errors'] or '-'} |")  # fmt: skip
    if "adapt" in what:
        rows = bench_adapt(args, episodes)
        print(
            f"\nAdaptations, {args.clients} clients, 5-way 1-shot, {args.workers} worker(s), "
            f"{args.api_processes} API process(es):\n"
        )
        print("| mode, setting | tasks/s | p50 ms | vs one at a time | API CPU ms/task | "
              "worker CPU ms/task | errors |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            mode = row["name"].split(",")[0]
            base = next(r["rate"] for r in rows if r["name"] == f"{mode}, adapt_batch_max_jobs=1")
            print(f"| {row['name']} | {row['rate']:.1f} | {row['p50_ms']:.0f} | "
                  f"{row['rate'] / base:.2f}x | {row['api_cpu_ms']:.1f} | "
                  f"{row['worker_cpu_ms']:.1f} | {row['errors'] or '-'} |")  # fmt: skip
    if "drain" in what:
        rows = bench_drain(args, episodes)
        print(f"\nWorkers draining {args.line} queued 5-way 1-shot adapt jobs, "
              f"{args.workers} worker(s):\n")  # fmt: skip
        print("| mode, setting | jobs/s | vs one at a time | failed |")
        print("|---|---|---|---|")
        for row in rows:
            mode = row["name"].split(",")[0]
            base = next(r["rate"] for r in rows if r["name"] == f"{mode}, adapt_batch_max_jobs=1")
            print(f"| {row['name']} | {row['rate']:.1f} | {row['rate'] / base:.2f}x | "
                  f"{row['failed']} |")  # fmt: skip
    if "overload" in what:
        result = bench_overload(args, episodes)
        print(f"\nPOST /v1/tasks past a tenant backlog of 8 queued jobs ({args.refusals} refused):")
        print(f"  status codes {result['codes']}; refusal latency p50 {result['p50_ms']:.1f} ms, "
              f"p99 {result['p99_ms']:.1f} ms")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    main()
