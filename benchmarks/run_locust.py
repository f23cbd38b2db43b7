"""The Locust mixed load against PostgreSQL + Redis + Celery: per-route rates, percentiles, RSS.

Starts a private stack (benchmarks/stack.py) and runs benchmarks/locustfile.py headless in one
Locust process: users ramp 1 -> --users over the first half of the warm-up (--warmup-seconds),
hold through the rest of it, then the soak (--seconds) runs at --users. API and worker RSS are
read when the stack is up, when the warm-up ends (Locust's statistics are reset then, so the
tables cover the soak only) and when the soak ends; the growth over the soak must stay below
--max-growth percent, or the run prints FAIL and exits 1. RSS is also sampled every
--sample-seconds, with the adapted-model cache gauges of the API and (one worker) the worker;
--cache-mib sets the cache budget per process (default: the service's, 256 MiB). With
--until-caches-full the warm-up lasts until the caches read full (at least --warmup-seconds, at
most --warmup-max-seconds), so the soak starts at steady state however fast the box fills them.
With --warmup-seconds 0 the ramp takes the first 60% of --seconds, as before.

    .venv/bin/python -m benchmarks.run_locust [--seconds 150] [--users 64] [--workers 1]
    nice -n 19 .venv/bin/python -m benchmarks.run_locust --warmup-seconds 60 --seconds 300
    nice -n 19 .venv/bin/python -m benchmarks.run_locust --seconds 300 --cache-mib 32
    .venv/bin/python -m benchmarks.run_locust --warmup-seconds 300 --until-caches-full --seconds 300
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.stack import ROOT, free_port, running_stack

MIB = 1024 * 1024
# Seconds since the stack was up, label, RSS by process group, API and worker cache bytes.
Sample = tuple[float, str, dict[str, int], tuple[int | None, int | None]]


def main() -> None:
    """Run the warm-up and the soak, print the tables, exit 1 when RSS grew too much."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150, help="soak, after the warm-up")
    parser.add_argument("--warmup-seconds", type=float, default=60)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes")
    parser.add_argument("--api-processes", type=int, default=1)
    parser.add_argument("--max-growth", type=float, default=10.0, help="percent, over the soak")
    parser.add_argument("--sample-seconds", type=float, default=30.0)
    parser.add_argument(
        "--cache-mib", type=float, default=None, help="adapted-model cache budget per process"
    )
    parser.add_argument(
        "--until-caches-full",
        action="store_true",
        help="end the warm-up (at least --warmup-seconds) only once the adapted-model caches "
        "are full, so the soak measures steady state (at most --warmup-max-seconds)",
    )
    parser.add_argument("--warmup-max-seconds", type=float, default=1800)
    args = parser.parse_args()
    if importlib.util.find_spec("locust") is None:
        raise SystemExit(
            "Locust is not installed in this environment: .venv/bin/pip install -e '.[bench]'"
        )
    out = Path(tempfile.mkdtemp(prefix="maml-serve-locust-"))
    mark = out / "warmed"
    go = out / "go"
    budget = int((args.cache_mib * MIB) if args.cache_mib is not None else _default_budget())
    total = args.warmup_seconds + args.seconds
    ramp = 0.5 * args.warmup_seconds if args.warmup_seconds > 0 else 0.6 * args.seconds
    settings: dict[str, str] = {}
    if args.cache_mib is not None:
        settings["MAML_SERVE_ADAPTED_CACHE_BYTES"] = str(int(args.cache_mib * MIB))
    worker_metrics = ""
    if args.workers == 1:
        # One worker: its metrics server tells how full its adapted-model cache is.
        port = free_port()
        settings["MAML_SERVE_WORKER_METRICS_PORT"] = str(port)
        worker_metrics = f"http://127.0.0.1:{port}/metrics"
    with running_stack(
        settings, celery=True, workers=args.workers, api_processes=args.api_processes
    ) as stack:
        samples: list[Sample] = []
        start = time.monotonic()

        def sample(label: str) -> dict[str, int]:
            rss = stack.rss()
            caches = (_cache_bytes(f"{stack.url}/metrics"), _cache_bytes(worker_metrics))
            samples.append((time.monotonic() - start, label, rss, caches))
            return rss

        sample("stack up")
        env = {
            **os.environ,
            "MAML_SERVE_BENCH_KEY": stack.key,
            "MAML_SERVE_BENCH_USERS": str(args.users),
            "MAML_SERVE_BENCH_SECONDS": str(total),
            "MAML_SERVE_BENCH_RAMP": str(ramp),
            "MAML_SERVE_BENCH_WARMUP": str(args.warmup_seconds),
            "MAML_SERVE_BENCH_MARK": str(mark),
            "PYTHONPATH": str(ROOT),
        }
        if args.until_caches_full:
            env["MAML_SERVE_BENCH_GO"] = str(go)
            env["MAML_SERVE_BENCH_SOAK"] = str(args.seconds)
        locust = subprocess.Popen(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks/locustfile.py"),
             "--headless", "--host", stack.url, "--csv", str(out / "run"),
             "--only-summary", "--loglevel", "WARNING"],
            env=env, cwd=ROOT,
        )  # fmt: skip
        stop = threading.Event()

        def sample_until_stopped() -> None:
            while not stop.wait(args.sample_seconds):
                sample("")

        sampler = threading.Thread(target=sample_until_stopped, daemon=True)
        sampler.start()
        warmed: dict[str, int] | None = None
        last_check = 0.0
        while locust.poll() is None:
            elapsed = time.monotonic() - start
            if (
                args.until_caches_full
                and not go.exists()
                and elapsed >= args.warmup_seconds
                and elapsed - last_check >= 5
            ):
                last_check = elapsed
                caches = (_cache_bytes(f"{stack.url}/metrics"), _cache_bytes(worker_metrics))
                # Full: no room for another full-mode model (~0.45 MiB for Conv4).
                full = all(c is None or c >= budget - max(0.01 * budget, MIB) for c in caches)
                if full or elapsed >= args.warmup_max_seconds:
                    go.touch()
            if (
                warmed is None
                and (args.warmup_seconds > 0 or args.until_caches_full)
                and (mark.exists())
            ):
                warmed = sample("warm-up done")
            time.sleep(0.2)
        after = sample("soak done")
        stop.set()
        sampler.join()
    if not (out / "run_stats.csv").exists():
        raise SystemExit(f"Locust exited with status {locust.returncode} and wrote no statistics")
    before = warmed if warmed is not None else samples[0][2]
    ok = _report(out, args, samples, before, after)
    if not ok:
        sys.exit(1)


def _default_budget() -> int:
    """The service's default adapted-model cache budget per process, in bytes."""
    from app.core.config import Settings

    return int(Settings.model_fields["adapted_cache_bytes"].default)


def _cache_bytes(url: str) -> int | None:
    """The adapted-model cache gauge at a Prometheus endpoint, or None when it cannot be read."""
    if not url:
        return None
    try:
        text = httpx.get(url, timeout=10).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("maml_serve_model_cache_bytes"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _report(
    out: Path,
    args: argparse.Namespace,
    samples: list[Sample],
    before: dict[str, int],
    after: dict[str, int],
) -> bool:
    """Print the tables; True when RSS growth over the soak is below --max-growth."""
    warm = f"{args.warmup_seconds:.0f} s"
    if args.until_caches_full:
        warm = f"at least {warm}, until the caches were full"
    print(f"\nLocust, {args.users} users, {args.workers} worker(s); warm-up {warm} "
          f"(ramp 1 -> {args.users}), then the soak: {args.seconds:.0f} s. "
          "Route statistics cover the soak only.\n")  # fmt: skip
    print("| route | requests | req/s | p50 ms | p95 ms | p99 ms | failures |")
    print("|---|---|---|---|---|---|---|")
    with (out / "run_stats.csv").open() as handle:
        for row in csv.DictReader(handle):
            print(f"| {row['Name']} | {row['Request Count']} | {float(row['Requests/s']):.1f} | "
                  f"{row['50%']} | {row['95%']} | {row['99%']} | {row['Failure Count']} |")  # fmt: skip
    errors: dict[str, int] = {}
    failures = out / "run_failures.csv"
    if failures.is_file():
        with failures.open() as handle:
            for row in csv.DictReader(handle):
                key = f"{row['Name']}: {row['Error']}"
                errors[key] = errors.get(key, 0) + int(row["Occurrences"])
    print("\nErrors by route and code:", errors or "none")
    budget = "default" if args.cache_mib is None else f"{args.cache_mib:g} MiB"
    print(f"\nAdapted-model cache budget per process: {budget}.\n")
    print("| s | API RSS MiB | workers RSS MiB | API cache MiB | worker cache MiB | |")
    print("|---|---|---|---|---|---|")
    for seconds, label, rss, caches in sorted(samples, key=lambda s: s[0]):
        api, worker = ("?" if c is None else f"{c / MIB:.1f}" for c in caches)
        print(f"| {seconds:.0f} | {rss['api'] / MIB:.0f} | {rss['workers'] / MIB:.0f} | "
              f"{api} | {worker} | {label} |")  # fmt: skip
    ok = True
    print()
    for name in ("api", "workers"):
        growth = (after[name] / max(before[name], 1) - 1) * 100
        passed = growth < args.max_growth
        ok = ok and passed
        print(f"RSS {name}: {before[name] / MIB:.0f} MiB after the warm-up, "
              f"{after[name] / MIB:.0f} MiB after the soak ({growth:+.1f}%): "
              f"{'PASS' if passed else 'FAIL'} (< {args.max_growth:g}%)")  # fmt: skip
    print("PASS" if ok else f"FAIL: RSS grew by {args.max_growth:g}% or more over the soak")
    return ok


if __name__ == "__main__":
    main()
