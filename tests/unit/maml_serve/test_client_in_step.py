"""maml_serve/client.py is exactly what scripts/gen_sync_client.py makes from async_client.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_sync_client_is_generated_from_the_async_one() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_sync_client", ROOT / "scripts/gen_sync_client.py"
    )
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    expected = generator.formatted(
        generator.generate((ROOT / "maml_serve/async_client.py").read_text())
    )
    assert (ROOT / "maml_serve/client.py").read_text() == expected, (
        "maml_serve/client.py is out of step: run .venv/bin/python scripts/gen_sync_client.py"
    )
