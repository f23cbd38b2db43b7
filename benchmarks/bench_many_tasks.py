"""Memory over many adapted tasks: create N tasks, predict on each, RSS within the cache budgets.

Starts a private PostgreSQL + Redis + Celery stack (benchmarks/stack.py; one API process and
--workers Celery workers) with MAML_SERVE_ADAPTED_CACHE_BYTES set to --cache-mib, so the
adapted-model caches of the API (models loaded for predictions) and of each worker (models it
adapted) are full after a few dozen tasks. --clients threads each create a distinct 5-way 1-shot
Omniglot task (POST /v1/tasks?wait, --mode head by default) and predict on it (--queries
images). API and worker RSS are read every --sample-every tasks. PASS when, for the API and the
workers, the final RSS <= RSS at the first sample + the cache budget (per process) + --margin-mib.

    nice -n 19 .venv/bin/python -m benchmarks.bench_many_tasks [--tasks 10000] [--clients 8]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from benchmarks.episodes import Episodes, Files
from benchmarks.stack import Stack, running_stack

MIB = 1024 * 1024


@dataclass
class Sample:
    """RSS and API cache bytes after some tasks."""

    tasks: int
    seconds: float
    api: int
    workers: int
    api_cache: int | None


class Client:
    """Creates one task and predicts on it, per call, from one thread's HTTP connection."""

    def __init__(self, stack: Stack, episodes: Episodes, mode: str, queries: int) -> None:
        self.stack = stack
        self.episodes = episodes
        self.mode = mode
        self.queries = queries
        self.lock = threading.Lock()
        self.local = threading.local()
        self.codes: Counter[str] = Counter()

    def _http(self) -> httpx.Client:
        client = getattr(self.local, "client", None)
        if client is None:
            client = httpx.Client(
                base_url=self.stack.url,
                headers={"Authorization": f"Bearer {self.stack.key}"},
                timeout=120,
            )
            self.local.client = client
        return client

    def one(self, _: int) -> None:
        """Create one adapted task (waiting until it is ready) and predict on it."""
        with self.lock:
            files, data = self.episodes.support(self.mode)
            queries = self.episodes.queries(self.queries)
        body = self._post("/v1/tasks?wait=60", files, data, "POST /v1/tasks")
        if body is None:
            return
        task_id = body["id"]
        deadline = time.monotonic() + 300
        while body.get("status") != "ready":
            if body.get("status") == "failed" or time.monotonic() > deadline:
                self._count(f"task {body.get('status')}")
                return
            time.sleep(0.2)
            body = self._http().get(f"/v1/tasks/{task_id}").json()
        self._post(f"/v1/tasks/{task_id}/predictions", queries, {}, "POST predictions")

    def _post(self, url: str, files: Files, data: dict[str, Any], name: str) -> Any:
        for _ in range(100):
            response = self._http().post(url, files=files, data=data)
            self._count(f"{name} {response.status_code}")
            if response.status_code in (429, 503):
                # Overload is answered with Retry-After: honour it, then try again.
                time.sleep(float(response.headers.get("Retry-After", "1")))
                continue
            if response.is_success:
                return response.json()
            return None
        return None

    def _count(self, key: str) -> None:
        with self.lock:
            self.codes[key] += 1


def _api_cache_bytes(stack: Stack) -> int | None:
    """The API's adapted-model cache gauge from /metrics, or None when it cannot be read."""
    try:
        text = httpx.get(f"{stack.url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return None
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("maml_serve_model_cache_bytes")
        )
    )


def main() -> None:
    """Create and predict on --tasks tasks, print the RSS table and PASS or FAIL."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    parser.add_argument("--mode", choices=("head", "full"), default="head")
    parser.add_argument("--queries", type=int, default=4, help="query images per prediction")
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes")
    parser.add_argument("--cache-mib", type=float, default=8.0, help="adapted-model cache budget")
    parser.add_argument("--margin-mib", type=float, default=64.0, help="fixed overhead allowed")
    parser.add_argument("--sample-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    budget = int(args.cache_mib * MIB)
    settings = {"MAML_SERVE_ADAPTED_CACHE_BYTES": str(budget)}
    episodes = Episodes(seed=args.seed)
    samples: list[Sample] = []
    with running_stack(settings, celery=True, workers=args.workers) as stack:
        client = Client(stack, episodes, args.mode, args.queries)
        start = time.monotonic()

        def sample(done: int) -> None:
            rss = stack.rss()
            seconds = time.monotonic() - start
            samples.append(
                Sample(done, seconds, rss["api"], rss["workers"], _api_cache_bytes(stack))
            )

        sample(0)
        done = 0
        with (
            ThreadPoolExecutor(args.clients) as pool,
            tqdm(total=args.tasks, unit="task", mininterval=5.0) as bar,
        ):
            futures = [pool.submit(client.one, index) for index in range(args.tasks)]
            for future in as_completed(futures):
                future.result()
                done += 1
                bar.update()
                if done % args.sample_every == 0 or done == args.tasks:
                    sample(done)
        codes = dict(client.codes)
    ok = _report(args, samples, budget, codes)
    if not ok:
        sys.exit(1)


def _report(
    args: argparse.Namespace, samples: list[Sample], budget: int, codes: dict[str, int]
) -> bool:
    """Print the table and the check; True when both processes stayed within the bound."""
    print(f"\n{args.tasks} {args.mode}-mode 5-way 1-shot tasks, each predicted on "
          f"({args.queries} images), {args.clients} clients, {args.workers} worker(s); "
          f"adapted-model cache budget {args.cache_mib:g} MiB per process.\n")  # fmt: skip
    print("| tasks done | s | API RSS MiB | worker RSS MiB | API cache MiB |")
    print("|---|---|---|---|---|")
    for s in samples:
        cache = "?" if s.api_cache is None else f"{s.api_cache / MIB:.1f}"
        print(
            f"| {s.tasks} | {s.seconds:.0f} | {s.api / MIB:.0f} | {s.workers / MIB:.0f} | {cache} |"
        )
    print("\nResponses:", ", ".join(f"{k}: {v}" for k, v in sorted(codes.items())))
    base = next((s for s in samples if s.tasks > 0), samples[0])
    final = samples[-1]
    ok = True
    margin = int(args.margin_mib * MIB)
    for name, first, last, processes in (
        ("API", base.api, final.api, 1),
        ("workers", base.workers, final.workers, args.workers),
    ):
        bound = first + processes * budget + margin
        passed = last <= bound
        ok = ok and passed
        print(f"{name}: {last / MIB:.0f} MiB after {final.tasks} tasks; bound {bound / MIB:.0f} MiB "
              f"= {first / MIB:.0f} MiB after {base.tasks} + {processes * budget / MIB:g} MiB cache "
              f"+ {margin / MIB:g} MiB margin: {'PASS' if passed else 'FAIL'}")  # fmt: skip
    print("PASS" if ok else "FAIL: RSS went past the cache budget plus the fixed margin")
    return ok


if __name__ == "__main__":
    main()
