"""The Locust mixed load against PostgreSQL + Redis + Celery: per-route rates and percentiles.

Starts a private stack (benchmarks/stack.py), warms it up, records API and worker RSS, runs
benchmarks/locustfile.py headless (ramp 1 -> --users over 60% of --seconds, then hold),
records RSS again and prints req/s, p50/p95/p99 per route and errors by code.

    .venv/bin/python -m benchmarks.run_locust [--seconds 150] [--users 64] [--workers 1]
    .venv/bin/python -m benchmarks.run_locust --seconds 300   # the 5-minute soak
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.stack import ROOT, running_stack


def main() -> None:
    """Run the load and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes")
    parser.add_argument("--api-processes", type=int, default=1)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="maml-serve-locust-"))
    with running_stack(
        {}, celery=True, workers=args.workers, api_processes=args.api_processes
    ) as stack:
        before = stack.rss()
        env = {
            **os.environ,
            "MAML_SERVE_BENCH_KEY": stack.key,
            "MAML_SERVE_BENCH_USERS": str(args.users),
            "MAML_SERVE_BENCH_SECONDS": str(args.seconds),
            "PYTHONPATH": str(ROOT),
        }
        subprocess.run(
            [sys.executable, "-m", "locust", "-f", str(ROOT / "benchmarks/locustfile.py"),
             "--headless", "--host", stack.url, "--csv", str(out / "run"),
             "--only-summary", "--loglevel", "WARNING"],
            env=env, cwd=ROOT, check=False,
        )  # fmt: skip
        after = stack.rss()
    _report(out, args, before, after)


def _report(
    out: Path, args: argparse.Namespace, before: dict[str, int], after: dict[str, int]
) -> None:
    print(f"\nLocust, ramp 1 -> {args.users} users over {0.6 * args.seconds:.0f} s, "
          f"{args.seconds:.0f} s in all, {args.workers} worker(s):\n")  # fmt: skip
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
    mib = 1024 * 1024
    for name in ("api", "workers"):
        print(f"RSS {name}: {before[name] / mib:.0f} MiB before, {after[name] / mib:.0f} MiB after "
              f"({(after[name] / max(before[name], 1) - 1) * 100:+.1f}%)")  # fmt: skip


if __name__ == "__main__":
    main()
