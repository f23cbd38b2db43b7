"""Model cards: a Markdown summary of how an initialization was made and how well it does."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fewshot.unknown import NORM_SHARE


def _by_shape(named: dict[str, Any]) -> list[tuple[str, Any]]:
    # config.json stores its keys sorted ("5-way 20-shot" before "5-way 5-shot"); a card reads
    # in task order.
    def key(item: tuple[str, Any]) -> tuple[int, int, str]:
        found = re.match(r"(\d+)-way (\d+)-shot", item[0])
        return (int(found[1]), int(found[2]), item[0]) if found else (10**9, 0, item[0])

    return sorted(named.items(), key=key)


def render_model_card(metadata: dict[str, Any], curve: bool = False) -> str:
    """Markdown for an initialization's metadata (command, data, wall time, hardware, metrics,
    adaptation timings, "unknown" report; with `curve`, the curve.png beside it)."""
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
        ("calibrated_from", "Calibrated anew from"),
        ("calibration_command", "Calibration command"),
    ):
        if key in metadata:
            value = metadata[key]
            if isinstance(value, list):
                value = ", ".join(map(str, value))
            lines.append(
                f"- **{title}**: `{value}`"
                if key.endswith("command")
                else f"- **{title}**: {value}"
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
        for name, m in _by_shape(metrics):
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
        for name, r in _by_shape(report):
            lines.append(
                f"| {name} | {100 * r['in_task_kept']:.1f}% | {100 * r['in_task_accuracy']:.1f}% "
                f"| {100 * r['in_task_accuracy_without_unknown']:.1f}% "
                f"| {100 * r['out_of_task_flagged']:.1f}% | {100 * r['blank_flagged']:.0f}% "
                f"| {100 * r['noise_flagged']:.0f}% | {int(r['episodes'])} |"
            )
    lines += ["", "Weights: `weights.safetensors`; architecture and metadata: `config.json`."]
    timings = metadata.get("timings") or {}
    if timings:
        lines += [
            "",
            "## Single-task adaptation (as served, this machine)",
            "",
            "| task | adapt p50 | adapted model |",
            "|---|---|---|",
        ]
        for name, t in _by_shape(timings):
            lines.append(
                f"| {name} | {t['adapt_ms_p50']:.1f} ms | {t['model_bytes'] / 1024:.0f} KiB |"
            )
    if curve:
        lines += ["", "![training curve](curve.png)"]
    return "\n".join([*lines, ""])


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
    """Write README.md beside the weights (showing curve.png where the folder has one)."""
    path = Path(folder) / "README.md"
    path.write_text(render_model_card(metadata, curve=(Path(folder) / "curve.png").is_file()))
    return path
