"""Model cards: a Markdown summary of how an initialization was made and how well it does."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_model_card(metadata: dict[str, Any]) -> str:
    """Markdown for an initialization's metadata (command, data, wall time, hardware, metrics)."""
    lines = [f"# Initialization {metadata.get('version', 'unversioned')}", ""]
    for key, title in (
        ("command", "Command"),
        ("data", "Data"),
        ("validation_groups", "Validation groups (held out)"),
        ("wall_time_s", "Meta-training wall time (s)"),
        ("iterations", "Meta-iterations"),
        ("hardware", "Hardware"),
        ("note", "Note"),
    ):
        if key in metadata:
            value = metadata[key]
            if isinstance(value, list):
                value = ", ".join(map(str, value))
            lines.append(
                f"- **{title}**: `{value}`" if key == "command" else f"- **{title}**: {value}"
            )
    metrics = metadata.get("metrics") or {}
    if metrics:
        lines += [
            "",
            "## Validation accuracy (held-out groups, 95% CI)",
            "",
            "| task | accuracy | episodes |",
            "|---|---|---|",
        ]
        for name, m in metrics.items():
            lines.append(
                f"| {name} | {100 * m['accuracy']:.2f}% ± {100 * m['ci95']:.2f} | {m['episodes']} |"
            )
    lines += ["", "Weights: `weights.safetensors`; architecture and metadata: `config.json`.", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, metadata: dict[str, Any]) -> Path:
    """Write README.md beside the weights."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(metadata))
    return path
