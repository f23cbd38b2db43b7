"""The core stays framework-free: importing fewshot pulls in no web, queue or database stack."""

from __future__ import annotations

import subprocess
import sys


def test_fewshot_imports_no_service_frameworks() -> None:
    code = (
        "import sys, fewshot, fewshot.training, fewshot.cli, fewshot.evaluate, fewshot.data; "
        "print(','.join(sorted(m for m in ('fastapi', 'celery', 'sqlalchemy', 'starlette', 'redis') "
        "if m in sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"fewshot imported {out.stdout.strip()}"
