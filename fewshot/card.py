"""Model cards: a Markdown summary of how an initialization was made and how well it does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewshot.unknown import NORM_SHARE


def render_model_card(metadata: dict[str, Any]) -> str:
    """Markdown for an initialization's metadata (command, data, wall time, hardware, metrics)."""
    lines = [f"# Initialization {metadata.get('version', 'unversioned')}", ""]
    for key, title in (
        ("command", "Command"),
        ("data", "Data"),
        ("validation_groups", "Validation groups (held out)"),
        ("training_groups", "Training groups"),
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
            "Served: the initialization's inner steps; 0 steps: the same episodes with no inner step "
            "(the prototype head on the meta-learned backbone); gain: their paired difference.",
            "",
            "| task | served | 0 steps | gain (points) | episodes |",
            "|---|---|---|---|---|",
        ]
        for name, m in metrics.items():
            zero, gain = "n/a", "n/a"
            if m.get("accuracy_0_steps") is not None:
                zero = f"{100 * m['accuracy_0_steps']:.2f}% ± {100 * m['ci95_0_steps']:.2f}"
                gain = f"{100 * m['adaptation_gain']:+.2f} ± {100 * m['adaptation_gain_ci95']:.2f}"
            lines.append(
                f"| {name} | {100 * m['accuracy']:.2f}% ± {100 * m['ci95']:.2f} | {zero} | {gain} "
                f"| {m['episodes']} |"
            )
    targets = metadata.get("targets") or {}
    if targets:
        lines += ["", "## Targets", "", "| task | target | measured | met |", "|---|---|---|---|"]
        for name, target in targets.items():
            measured = (metrics.get(name) or {}).get("accuracy")
            shown = f"{100 * measured:.2f}%" if measured is not None else "not measured"
            met = "met" if measured is not None and measured >= target else "not met"
            lines.append(f"| {name} | >= {100 * target:.1f}% | {shown} | {met} |")
    report = ((metadata.get("unknown") or {}).get("details") or {}).get("report") or {}
    if report:
        threshold = (metadata.get("unknown") or {}).get("threshold")
        shown = next(iter(report.values())).get("threshold", threshold)
        heading = (
            f"at the default threshold (p-value {threshold})"
            if shown == threshold
            else f"at p-value {shown} on request (the default is {threshold}"
            + (": 'unknown' is off unless a request or task asks)" if not threshold else ")")
        )
        lines += [
            "",
            f'## "None of these" {heading}',
            "",
            "Per task: share of in-task queries kept, in-task accuracy counting 'unknown' as an "
            "error (and without the unknown decision), share of queries from classes outside the "
            "task flagged 'unknown', and of blank and uniform-noise images."
            + _norm_check_sentence(metadata.get("unknown") or {}),
            "",
            "| task | in-task kept | in-task accuracy | without unknown | out-of-task flagged "
            "| blank flagged | noise flagged | episodes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, r in report.items():
            lines.append(
                f"| {name} | {100 * r['in_task_kept']:.1f}% | {100 * r['in_task_accuracy']:.1f}% "
                f"| {100 * r['in_task_accuracy_without_unknown']:.1f}% "
                f"| {100 * r['out_of_task_flagged']:.1f}% | {100 * r['blank_flagged']:.0f}% "
                f"| {100 * r['noise_flagged']:.0f}% | {int(r['episodes'])} |"
            )
    lines += ["", "Weights: `weights.safetensors`; architecture and metadata: `config.json`.", ""]
    return "\n".join(lines)


def _norm_check_sentence(unknown: dict[str, Any]) -> str:
    norms = unknown.get("norms")
    if not isinstance(norms, list) or not norms:
        return ""
    share = float(unknown.get("norm_share", NORM_SHARE))
    size = unknown.get("norm_size")
    counted = int(size) if isinstance(size, int) and size > len(norms) else len(norms)
    details = unknown.get("details")
    distance = details.get("distance") if isinstance(details, dict) else None
    measure = (
        "the PLDA likelihood ratio of the likeliest class (fewshot.plda)"
        if distance == "plda"
        else "the distance to the nearest prototype"
    )
    return (
        f" The score combines {measure} with a norm check: the "
        f"embedding's norm before normalisation, ranked among {counted} held-out norms "
        f"({min(norms):.2f} to {max(norms):.2f}); {share:.0%} of the threshold goes to it."
    )


def write_model_card(folder: str | Path, metadata: dict[str, Any]) -> Path:
    """Write README.md beside the weights."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(metadata))
    return path
