"""Accuracy against shots for every shipped initialization, from their model cards' metrics.

    .venv/bin/python benchmarks/plot_accuracy.py --out docs/plots/accuracy-vs-shots.png

One line per initialization and way count (within-alphabet shapes apart), 95% intervals as bars;
the figures are those each card records (validation classes, as served).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SHIPPED = Path(__file__).resolve().parents[1] / "fewshot" / "shipped"
SHAPE = re.compile(r"^(\d+)-way (\d+)-shot( within-alphabet)?$")


def series(folder: Path) -> tuple[str, dict[str, list[tuple[int, float, float]]]]:
    """The version and, per way count, (shots, accuracy, ci95) points of one shipped folder."""
    metadata = json.loads((folder / "config.json").read_text())["metadata"]
    lines: dict[str, list[tuple[int, float, float]]] = {}
    for name, result in (metadata.get("metrics") or {}).items():
        match = SHAPE.match(name)
        if match is None or not isinstance(result, dict) or "accuracy" not in result:
            continue
        ways, shots, within = int(match[1]), int(match[2]), bool(match[3])
        label = f"{ways}-way" + (" within-alphabet" if within else "")
        lines.setdefault(label, []).append((shots, result["accuracy"], result.get("ci95", 0.0)))
    return str(metadata.get("version", folder.name)), lines


def main() -> None:
    """Draw the plot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/plots/accuracy-vs-shots.png"))
    args = parser.parse_args()
    folders = sorted(p for p in SHIPPED.iterdir() if (p / "config.json").is_file())
    fig, axes = plt.subplots(1, len(folders), figsize=(5 * len(folders), 3.8), squeeze=False)
    for axis, folder in zip(axes[0], folders, strict=True):
        version, lines = series(folder)
        for label, points in sorted(lines.items()):
            points.sort()
            shots = [p[0] for p in points]
            axis.errorbar(shots, [100 * p[1] for p in points],
                          yerr=[100 * p[2] for p in points], marker="o", capsize=3, label=label)  # fmt: skip
        axis.set_xscale("log")
        axis.set_xticks(sorted({s for pts in lines.values() for s, _, _ in pts}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("shots per class")
        axis.set_ylabel("validation accuracy (%)")
        axis.set_title(version)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
