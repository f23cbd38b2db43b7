"""Service overhead: POST-to-ready latency and prediction throughput over HTTP vs in-process.

Starts `maml-serve serve` (embedded default) on a free port with a private data folder, or
measures a running server with --url/--key. Episodes are 5-way 1-shot from the Omniglot zip.

    .venv/bin/python benchmarks/bench_service.py [--episodes 30] [--batch 32] [--repeats 20]
        [--mode full|head]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import torch

import fewshot
from app.core.allocator import jemalloc_loaded, use_configured
from fewshot.fast import adapt_fast

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZIP = os.environ.get(
    "MAML_SERVE_OMNIGLOT_ZIP", str(ROOT.parent / "shared/data/omniglot/images_background.zip")
)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def load_characters(path: str) -> tuple[zipfile.ZipFile, list[list[str]]]:
    """The zip and its drawings grouped by character."""
    archive = zipfile.ZipFile(path)
    groups: dict[str, list[str]] = {}
    for name in archive.namelist():
        if name.endswith(".png"):
            groups.setdefault(name.rsplit("/", 1)[0], []).append(name)
    return archive, [sorted(v) for _, v in sorted(groups.items())]


def episode(
    archive: zipfile.ZipFile, characters: list[list[str]], rng: random.Random, queries: int
) -> tuple[list[tuple[bytes, str]], list[bytes]]:
    """A 5-way 1-shot support set and `queries` query images drawn from its classes."""
    chosen = rng.sample(characters, 5)
    support = []
    pool = []
    for index, drawings in enumerate(chosen):
        picked = rng.sample(drawings, 5)
        support.append((archive.read(picked[0]), f"c{index}"))
        pool += [archive.read(name) for name in picked[1:]]
    return support, [pool[i % len(pool)] for i in range(queries)]


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere or unknown)."""
    if pid is None:
        return float("nan")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(data_dir: Path, init: Path | None) -> tuple[subprocess.Popen[bytes], str, str]:
    """An embedded server in a subprocess, a key for it, and its URL."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MAML_SERVE_")
        or k in ("MAML_SERVE_TORCH_THREADS", "MAML_SERVE_ALLOCATOR")
    }
    env["MAML_SERVE_DATA_DIR"] = str(data_dir)
    # Per-key rate limits high enough that the client measures the service, not its limiter.
    env.update(
        {
            "MAML_SERVE_KEY_RATE_PER_SECOND": "100000",
            "MAML_SERVE_KEY_RATE_BURST": "100000",
            "MAML_SERVE_KEY_MAX_IN_FLIGHT": "1000",
        }
    )
    if init is not None:
        env["MAML_SERVE_INITIALIZATION_PATH"] = str(init)
    cli = [sys.executable, "-m", "app.cli"]
    created = subprocess.run(
        [*cli, "keys", "create", "--tenant", "bench", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    key = json.loads(created.stdout)["key"]
    port = free_port()
    server = subprocess.Popen(
        [*cli, "serve", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return server, url, key
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not become ready")


def main() -> None:
    """Run both measurements and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32, help="query images per prediction request")
    parser.add_argument("--repeats", type=int, default=20, help="prediction requests to time")
    parser.add_argument("--zip", default=DEFAULT_ZIP)
    parser.add_argument(
        "--init", type=Path, help="initialization folder (default: the shipped one)"
    )
    parser.add_argument(
        "--mode", choices=["full", "head"], default="full", help="adaptation mode of the tasks"
    )
    parser.add_argument("--url", help="measure a running server instead of starting one")
    parser.add_argument("--key", help="API key for --url")
    parser.add_argument(
        "--allocator",
        choices=["auto", "jemalloc", "system"],
        default=os.environ.get("MAML_SERVE_ALLOCATOR", "auto"),
        help="memory allocator, as MAML_SERVE_ALLOCATOR (default: auto, as the service)",
    )
    args = parser.parse_args()
    # The allocator the service runs with (this may start the script again with it); the
    # servers it starts inherit the choice.
    os.environ["MAML_SERVE_ALLOCATOR"] = args.allocator
    use_configured(args.allocator)

    init_dir = args.init or fewshot.shipped_initialization_path()
    if not (init_dir / "weights.safetensors").is_file():
        random_dir = Path(tempfile.mkdtemp()) / "random-init"
        init = fewshot.Initialization.random(fewshot.ModelConfig(), seed=0)
        init.metadata["version"] = "bench-random"
        init.save(random_dir)
        init_dir = random_dir
        print(f"no shipped initialization; using a random Conv4 (same cost) at {init_dir}")
    # The server's serving threads use one intra-op thread unless MAML_SERVE_TORCH_THREADS says.
    torch.set_num_threads(int(os.environ.get("MAML_SERVE_TORCH_THREADS") or 1))
    init = fewshot.Initialization.load(init_dir)
    archive, characters = load_characters(args.zip)
    rng = random.Random(0)
    episodes = [episode(archive, characters, rng, args.batch) for _ in range(args.episodes + 3)]

    server = None
    if args.url:
        url, key = args.url, args.key
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="maml-serve-bench-"))
        server, url, key = start_server(data_dir, init_dir)
    headers = {"Authorization": f"Bearer {key}"}
    try:
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            latencies: list[float] = []
            task_ids: list[str] = []
            pid = None if server is None else server.pid
            post_cpu = float("nan")
            for i, (support, _) in enumerate(episodes):
                if i == 3:
                    post_cpu = cpu_seconds(pid)
                files = [
                    ("images", (f"{j}.png", data, "image/png"))
                    for j, (data, _) in enumerate(support)
                ]
                started = time.perf_counter()
                response = client.post(
                    "/v1/tasks",
                    params={"wait": 30},
                    files=files,
                    data={"labels": [lb for _, lb in support], "mode": args.mode},
                )
                elapsed = time.perf_counter() - started
                if response.status_code != 201:
                    raise SystemExit(
                        f"task not ready within the wait: {response.status_code} {response.text}"
                    )
                task_ids.append(response.json()["id"])
                if i >= 3:  # the first few warm up the server
                    latencies.append(elapsed)
            post_cpu = (cpu_seconds(pid) - post_cpu) / len(latencies)

            queries = [
                ("images", (f"q{j}.png", data, "image/png"))
                for j, data in enumerate(episodes[0][1])
            ]
            for _ in range(3):
                client.post(f"/v1/tasks/{task_ids[0]}/predictions", files=queries)
            predict_cpu = cpu_seconds(pid)
            started = time.perf_counter()
            for _ in range(args.repeats):
                response = client.post(f"/v1/tasks/{task_ids[0]}/predictions", files=queries)
                response.raise_for_status()
            http_rate = args.batch * args.repeats / (time.perf_counter() - started)
            predict_cpu = (cpu_seconds(pid) - predict_cpu) / args.repeats
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    # In-process: decode + preprocess + adapt (the loop the service runs, fewshot.fast) on the
    # same support sets, then decode + forward and the raw forward pass on the same queries.
    inproc: list[float] = []
    model = None
    for i, (support, _) in enumerate(episodes):
        started = time.perf_counter()
        x = fewshot.preprocess_images([fewshot.decode_image(d) for d, _ in support], init.config)
        model = adapt_fast(init, x, [label for _, label in support], mode=args.mode)
        if i >= 3:
            inproc.append(time.perf_counter() - started)
    assert model is not None

    def decoded() -> torch.Tensor:
        return fewshot.preprocess_images(
            [fewshot.decode_image(d) for d in episodes[0][1]], init.config
        )

    xq = decoded()
    for _ in range(3):
        model.predict_proba(decoded())
    started = time.perf_counter()
    for _ in range(args.repeats):
        model.predict_proba(decoded())
    decode_rate = args.batch * args.repeats / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(args.repeats):
        model.predict_proba(xq)
    raw_rate = args.batch * args.repeats / (time.perf_counter() - started)

    http50, http95 = percentile(latencies, 50) * 1e3, percentile(latencies, 95) * 1e3
    in50, in95 = percentile(inproc, 50) * 1e3, percentile(inproc, 95) * 1e3
    print(
        f"initialization: {init.version}  torch threads: {torch.get_num_threads()}  "
        f"episodes: {len(latencies)}  mode: {args.mode}  "
        f"allocator: {'jemalloc' if jemalloc_loaded() else 'system'} (server and in-process)"
    )
    print("5-way 1-shot POST-to-ready (ms)   p50      p95")
    print(f"  HTTP (POST ?wait, embedded)   {http50:7.1f}  {http95:7.1f}")
    print(f"  in-process adapt              {in50:7.1f}  {in95:7.1f}")
    print(f"  ratio HTTP / in-process       {http50 / in50:7.2f}  {http95 / in95:7.2f}")
    print(f"  server CPU per POST (ms)      {post_cpu * 1e3:7.1f}")
    print(f"prediction throughput, batch {args.batch} (images/s)")
    print(f"  HTTP                          {http_rate:9.0f}")
    print(f"  decode + forward, in-process  {decode_rate:9.0f}")
    print(f"  raw forward pass              {raw_rate:9.0f}")
    print(f"  ratio HTTP / decode + forward {http_rate / decode_rate:9.2f}")
    print(f"  ratio HTTP / raw              {http_rate / raw_rate:9.2f}")
    print(f"  server CPU per request (ms)   {predict_cpu * 1e3:9.1f}")
    print(f"  (mean of in-process adapt: {statistics.mean(inproc) * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
