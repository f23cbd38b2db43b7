"""Rules for production code that a reviewer would otherwise check by eye."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "worker", "fewshot", "maml_serve")


def test_production_code_has_no_assert() -> None:
    # `python -O` strips asserts: a check that guards behaviour must raise a real error.
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Assert):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
