""" "None of these" measured through the HTTP API on the initialization's validation alphabets.

Per episode: a task of `ways` characters of the validation alphabets (`shots` drawings each) is
created through POST /v1/tasks (embedded service: PNG decoding, adapt job, storage), then one
prediction request carries `queries` other drawings of each task character (in task), as many of
`ways` characters outside the task (out of task), a blank page and a uniform-noise image. The
shares come from the labels the API answers at the default threshold; the same responses' scores
give the shares at other thresholds (a prediction never depends on the other images).

    .venv/bin/python benchmarks/unknown_eval.py --episodes 50 --out unknown.json
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHAPES = ((5, 1), (5, 5), (20, 1), (20, 5))
THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
Files = list[tuple[str, tuple[str, bytes, str]]]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _files(images: list[bytes]) -> Files:
    return [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


def _characters(archive: zipfile.ZipFile, groups: list[str]) -> list[list[str]]:
    """Drawings per character of the given alphabets."""
    by_character: dict[str, list[str]] = {}
    for name in archive.namelist():
        parts = name.split("/")
        if name.endswith(".png") and len(parts) >= 4 and parts[-3] in groups:
            by_character.setdefault("/".join(parts[:-1]), []).append(name)
    return [sorted(v) for _, v in sorted(by_character.items())]


def _shape(
    client: TestClient,
    headers: dict[str, str],
    archive: zipfile.ZipFile,
    characters: list[list[str]],
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    rng: random.Random,
) -> dict[str, Any]:
    rows: dict[str, list[tuple[float, bool]]] = {"in": [], "out": [], "blank": [], "noise": []}
    correct: list[bool] = []
    correct_default: list[bool] = []
    threshold = None
    for episode in range(episodes):
        picked = rng.sample(characters, 2 * ways)
        support: list[bytes] = []
        labels: list[str] = []
        query: list[bytes] = []
        truth: list[str | None] = []
        for index, drawings in enumerate(picked):
            chosen = rng.sample(drawings, shots + queries)
            if index < ways:
                support += [archive.read(n) for n in chosen[:shots]]
                labels += [f"c{index}"] * shots
                query += [archive.read(n) for n in chosen[shots:]]
                truth += [f"c{index}"] * queries
            else:
                query += [archive.read(n) for n in chosen[:queries]]
                truth += [None] * queries
        noise = np.random.default_rng(episode).random((105, 105)) * 255
        query += [
            _png(Image.new("L", (105, 105), 255)),
            _png(Image.fromarray(noise.astype(np.uint8))),
        ]
        truth += ["<blank>", "<noise>"]
        for _ in range(30):
            response = client.post(
                "/v1/tasks?wait=120",
                headers=headers,
                files=_files(support),
                data={"labels": labels},
            )
            if response.status_code != 429:
                break
            # The tenant's adapt backlog is full: wait as told.
            print(f"429: {response.json()['detail']}", file=sys.stderr)
            time.sleep(float(response.headers.get("Retry-After", "1")))
        response.raise_for_status()
        assert response.json()["status"] == "ready", response.json()
        task_id = response.json()["id"]
        predictions: list[dict[str, Any]] = []
        for start in range(0, len(query), 200):
            answer = client.post(
                f"/v1/tasks/{task_id}/predictions",
                headers=headers,
                files=_files(query[start : start + 200]),
            )
            answer.raise_for_status()
            body = answer.json()
            threshold = body["unknown_threshold"]
            predictions += body["predictions"]
        client.delete(f"/v1/tasks/{task_id}", headers=headers).raise_for_status()
        for want, p in zip(truth, predictions, strict=True):
            unknown = p["label"] == "unknown"
            kind = {None: "out", "<blank>": "blank", "<noise>": "noise"}.get(want, "in")
            rows[kind].append((float(p["score"]), unknown))
            if kind == "in":
                best = max(p["probabilities"].items(), key=lambda item: item[1])[0]
                correct.append(best == want)
                correct_default.append(p["label"] == want)
    assert threshold is not None
    result: dict[str, Any] = {
        "default_threshold": threshold,
        "episodes": episodes,
        "in_task_queries": len(rows["in"]),
        "out_of_task_queries": len(rows["out"]),
        "in_task_accuracy_without_unknown": float(np.mean(correct)),
        "at": {},
    }
    for t in sorted({threshold, *THRESHOLDS}):
        flagged = {k: np.array([score < t for score, _ in v]) for k, v in rows.items()}
        kept = ~flagged["in"]
        result["at"][f"{t:g}"] = {
            "in_task_kept": float(kept.mean()),
            "in_task_accuracy": float((kept & np.array(correct)).mean()),
            "out_of_task_flagged": float(flagged["out"].mean()),
            "blank_flagged": float(flagged["blank"].mean()),
            "noise_flagged": float(flagged["noise"].mean()),
        }
    # The labels the API answered agree with the score rule at the default threshold.
    answered = {k: float(np.mean([u for _, u in v])) for k, v in rows.items()}
    result["answered_at_default"] = {
        "in_task_accuracy": float(np.mean(correct_default)),
        "in_task_unknown": answered["in"],
        "out_of_task_unknown": answered["out"],
        "blank_unknown": answered["blank"],
        "noise_unknown": answered["noise"],
    }
    return result


def main() -> int:
    """Run the shapes, print and write the figures."""
    import torch

    import fewshot
    from app.main import create_app
    from tests.helpers import create_key, make_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init", default=str(fewshot.shipped_initialization_path()))
    parser.add_argument(
        "--data", default=str(ROOT.parent / "shared/data/omniglot/images_background.zip")
    )
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--seed", type=int, default=10)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    init = fewshot.Initialization.load(args.init)
    groups = list(init.metadata["validation_groups"])
    archive = zipfile.ZipFile(args.data)
    characters = _characters(archive, groups)
    out: dict[str, Any] = {"version": init.version, "groups": groups, "shapes": {}}
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        settings = make_settings(Path(tmp) / "data", Path(args.init))
        with TestClient(create_app(settings)) as client:
            headers = create_key(client, "bench")
            for ways, shots in SHAPES:
                started = time.perf_counter()
                name = f"{ways}-way {shots}-shot"
                out["shapes"][name] = _shape(
                    client, headers, archive, characters, ways, shots, args.queries,
                    args.episodes, rng,
                )  # fmt: skip
                out["shapes"][name]["wall_s"] = round(time.perf_counter() - started, 1)
                print(json.dumps({name: out["shapes"][name]}), flush=True)
                Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
