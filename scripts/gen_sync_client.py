"""Write maml_serve/client.py from maml_serve/async_client.py, so the two clients stay in step.

.venv/bin/python scripts/gen_sync_client.py   # then commit both files
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ASYNC = ROOT / "maml_serve" / "async_client.py"
SYNC = ROOT / "maml_serve" / "client.py"

# (async text, sync text), applied in order; each must occur.
REPLACEMENTS = [
    (
        '"""AsyncClient: the maml-serve API from asyncio code (client.py is the same, synchronous)."""',
        '"""Client: the maml-serve API, synchronous.\n\nGenerated from async_client.py by scripts/gen_sync_client.py: edit that file and rerun.\n"""',
    ),
    ("import asyncio\n", ""),
    ("from collections.abc import AsyncIterator,", "from collections.abc import Iterator,"),
    ("class AsyncClient:", "class Client:"),
    (
        '"""An asyncio client of the maml-serve HTTP API (`async with AsyncClient(url, key) as c:`)."""',
        '"""A client of the maml-serve HTTP API (`with Client(url, key) as client:`)."""',
    ),
    ("httpx.AsyncBaseTransport", "httpx.BaseTransport"),
    ("httpx.AsyncClient(", "httpx.Client("),
    ("async def __aenter__(self) -> AsyncClient:", "def __enter__(self) -> Client:"),
    ("async def __aexit__(", "def __exit__("),
    ("await self._http.aclose()", "self._http.close()"),
    ("AsyncIterator[Task]", "Iterator[Task]"),
    ("await asyncio.sleep(", "time.sleep("),
    (
        "            for task in page.items:\n                yield task\n",
        "            yield from page.items\n",
    ),
    ("async def ", "def "),
    ("await ", ""),
]


def generate(async_source: str) -> str:
    """The synchronous client's source (before formatting) from the async client's."""
    text = async_source
    for old, new in REPLACEMENTS:
        if old not in text:
            raise ValueError(f"async_client.py no longer contains {old!r}")
        text = text.replace(old, new)
    return text


def formatted(source: str) -> str:
    """`source` as ruff format writes it."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(SYNC), "-"],
        input=source,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return result.stdout


def main() -> int:
    """Regenerate client.py."""
    SYNC.write_text(formatted(generate(ASYNC.read_text())))
    print(f"wrote {SYNC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
