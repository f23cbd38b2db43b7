"""Episodes for the benchmarks: Omniglot 5-way 1-shot support sets and queries, as multipart parts."""

from __future__ import annotations

import io
import os
import random
import zipfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ZIP = os.environ.get(
    "MAML_SERVE_OMNIGLOT_ZIP", str(ROOT.parent / "shared/data/omniglot/images_background.zip")
)
Files = list[tuple[str, tuple[str, bytes, str]]]


def _png(seed: int, size: int = 105) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    canvas = np.full((size, size), 255, dtype=np.uint8)
    canvas[rng.random((size, size)) < 0.2] = 0
    out = io.BytesIO()
    Image.fromarray(canvas, "L").save(out, format="PNG")
    return out.getvalue()


def synthetic_support(ways: int, seed: int) -> tuple[Files, dict[str, Any]]:
    """A support set of random drawings, one per class."""
    files = [("images", (f"{i}.png", _png(seed * 100 + i), "image/png")) for i in range(ways)]
    return files, {"labels": [f"c{i}" for i in range(ways)]}


class Episodes:
    """5-way 1-shot support sets and query batches drawn from the Omniglot zip (or random images)."""

    def __init__(self, path: str = DEFAULT_ZIP, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.characters: list[list[bytes]] = []
        if Path(path).is_file():
            with zipfile.ZipFile(path) as archive:
                groups: dict[str, list[str]] = {}
                for name in archive.namelist():
                    if name.endswith(".png"):
                        groups.setdefault(name.rsplit("/", 1)[0], []).append(name)
                chosen = self.rng.sample(sorted(groups), min(200, len(groups)))
                self.characters = [[archive.read(n) for n in sorted(groups[c])[:6]] for c in chosen]
        else:
            self.characters = [[_png(c * 10 + i) for i in range(6)] for c in range(40)]

    def support(self, mode: str = "full", ways: int = 5) -> tuple[Files, dict[str, Any]]:
        """A `ways`-way 1-shot support set as multipart files and form data."""
        chosen = self.rng.sample(self.characters, ways)
        files = [("images", (f"{i}.png", c[0], "image/png")) for i, c in enumerate(chosen)]
        return files, {"labels": [f"c{i}" for i in range(ways)], "mode": mode}

    def queries(self, count: int) -> Files:
        """`count` query drawings as multipart files."""
        pool = [image for c in self.rng.sample(self.characters, 5) for image in c[1:]]
        return [("images", (f"q{i}.png", pool[i % len(pool)], "image/png")) for i in range(count)]
