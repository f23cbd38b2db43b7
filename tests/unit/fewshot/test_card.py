"""Model cards show the 0-step column, the targets (met / not met) and the unknown figures."""

from __future__ import annotations

from pathlib import Path

from fewshot.card import render_model_card, write_model_card


def test_card_has_zero_steps_targets_and_unknown_sections() -> None:
    metric = {
        "accuracy": 0.95, "ci95": 0.01, "episodes": 1000, "accuracy_0_steps": 0.93,
        "ci95_0_steps": 0.01, "adaptation_gain": 0.02, "adaptation_gain_ci95": 0.005,
    }  # fmt: skip
    report = {
        "in_task_kept": 0.95, "in_task_accuracy": 0.9, "in_task_accuracy_without_unknown": 0.94,
        "out_of_task_flagged": 0.8, "blank_flagged": 1.0, "noise_flagged": 1.0, "episodes": 100,
    }  # fmt: skip
    card = render_model_card(
        {
            "version": "v9",
            "training_groups": ["A", "B"],
            "metrics": {"20-way 1-shot": metric, "5-way 1-shot": {"accuracy": 0.99, "ci95": 0.0,
                                                                   "episodes": 10}},
            "targets": {"20-way 1-shot": 0.965, "5-way 1-shot": 0.99, "5-way 5-shot": 0.997},
            "unknown": {"threshold": 0.05, "details": {"report": {"20-way 1-shot": report}}},
        }
    )  # fmt: skip
    assert "| 20-way 1-shot | 95.00% ± 1.00 | 93.00% ± 1.00 | +2.00 ± 0.50 | 1000 |" in card
    assert "| 5-way 1-shot | 99.00% ± 0.00 | n/a | n/a | 10 |" in card
    assert "| 20-way 1-shot | >= 96.5% | 95.00% | not met |" in card
    assert "| 5-way 1-shot | >= 99.0% | 99.00% | met |" in card
    assert "| 5-way 5-shot | >= 99.7% | not measured | not met |" in card
    assert "| 20-way 1-shot | 95.0% | 90.0% | 94.0% | 80.0% | 100% | 100% | 100 |" in card
    assert "- **Training groups**: A, B" in card
    assert '"None of these" at the default threshold (p-value 0.05)' in card


def _report(threshold: float) -> dict[str, float]:
    """One shape's "unknown" report row at `threshold`."""
    return {
        "threshold": threshold, "in_task_kept": 0.96, "in_task_accuracy": 0.49,
        "in_task_accuracy_without_unknown": 0.5, "out_of_task_flagged": 0.1,
        "blank_flagged": 0.5, "noise_flagged": 0.3, "episodes": 100,
    }  # fmt: skip


def test_card_says_when_unknown_is_off_by_default() -> None:
    """A photo initialization ships its calibration at threshold 0, reported at 0.05."""
    card = render_model_card(
        {"unknown": {"threshold": 0.0, "details": {"report": {"5-way 1-shot": _report(0.05)}}}}
    )
    assert '"None of these" at p-value 0.05 on request (the default is 0.0: ' in card
    assert "'unknown' is off unless a request or task asks" in card
    assert "norm check" not in card


def test_card_describes_the_norm_check_when_calibrated_with_norms() -> None:
    report = {"x": _report(0.01)}
    unknown = {"threshold": 0.01, "norms": [14.2, 20.0, 35.1], "details": {"report": report}}
    card = render_model_card({"unknown": unknown})
    assert "ranked among 3 held-out norms (14.20 to 35.10); 20% of the threshold" in card
    assert "distance to the nearest prototype" in card


def test_card_names_the_plda_score_when_calibrated_with_it() -> None:
    details = {"report": {"x": _report(0.01)}, "distance": "plda"}
    unknown = {"threshold": 0.01, "norms": [14.2, 35.1], "details": details}
    card = render_model_card({"unknown": unknown})
    assert "the PLDA likelihood ratio of the likeliest class" in card
    assert "nearest prototype" not in card


def test_card_reads_in_task_order_with_timings_and_the_curve_where_there_is_one(
    tmp_path: Path,
) -> None:
    """config.json sorts its keys ("5-way 20-shot" before "5-way 5-shot"); the card does not."""
    metric = {"accuracy": 0.5, "ci95": 0.01, "episodes": 600}
    names = ["20-way 1-shot", "5-way 20-shot", "5-way 5-shot", "5-way 1-shot"]
    timing = {"adapt_ms_p50": 12.34, "model_bytes": 2048}
    metadata = {
        "version": "v2",
        "metrics": {name: metric for name in names},
        "timings": {"5-way 20-shot": timing, "5-way 1-shot": timing},
    }
    card = render_model_card(metadata)
    rows = [card.index(f"| {name} | 50.00%") for name in names]
    assert rows == sorted(rows, reverse=True)  # 5w1s, 5w5s, 5w20s, 20w1s
    assert card.index("| 5-way 1-shot | 12.3 ms | 2 KiB |") < card.index("| 5-way 20-shot | 12.3")
    assert "curve.png" not in card
    assert "curve.png" not in write_model_card(tmp_path, metadata).read_text()
    (tmp_path / "curve.png").write_bytes(b"")
    assert "![training curve](curve.png)" in write_model_card(tmp_path, metadata).read_text()
