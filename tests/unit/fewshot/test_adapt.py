"""The public API: fewshot.adapt on any task shape, batch-independent probabilities, bad episodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fewshot
from fewshot.backbone import Conv4
from fewshot.inner import embed
from tests.fewshot_helpers import TINY, random_images, tiny_init


@pytest.fixture(scope="module")
def init() -> fewshot.Initialization:
    """A tiny float32 initialization."""
    return tiny_init(dtype=torch.float32)


@pytest.fixture(scope="module")
def shipped() -> fewshot.Initialization:
    """The committed, meta-trained initialization."""
    return fewshot.Initialization.load(fewshot.shipped_initialization_path())


def test_query_probabilities_do_not_depend_on_the_batch(shipped: fewshot.Initialization) -> None:
    support = random_images(5, shipped.config, seed=1, dtype=torch.float32)
    model = fewshot.adapt(shipped, support, ["a", "b", "c", "d", "e"])
    queries = random_images(64, shipped.config, seed=2, dtype=torch.float32)
    batch = model.predict_proba(queries)
    assert batch.shape == (64, 5)
    torch.testing.assert_close(batch.sum(dim=1), torch.ones(64), atol=1e-6, rtol=0)
    assert bool((batch >= 0).all())
    # float32 convolutions round differently per batch size (~1e-5); batch statistics would move
    # probabilities by far more than the tolerance.
    for i in (0, 17, 63):
        alone = model.predict_proba(queries[i : i + 1])[0]
        torch.testing.assert_close(alone, batch[i], atol=1e-4, rtol=0)
    flipped = model.predict_proba(queries.flip(0)).flip(0)
    torch.testing.assert_close(flipped, batch, atol=1e-4, rtol=0)


@pytest.mark.parametrize("ways", [2, 50])
def test_any_number_of_ways_with_string_labels(init: fewshot.Initialization, ways: int) -> None:
    labels = [f"class {i} ✓" for i in range(ways)]
    support = random_images(ways, seed=ways, dtype=torch.float32)
    model = fewshot.adapt(init, support, labels)
    assert model.labels == labels
    assert model.params["head.weight"].shape == (ways, TINY.width)
    proba = model.predict_proba(random_images(7, seed=3, dtype=torch.float32))
    assert proba.shape == (7, ways)
    torch.testing.assert_close(proba.sum(dim=1), torch.ones(7), atol=1e-5, rtol=0)
    # With the prototype head alone, a 1-shot support image is nearest its own prototype.
    assert fewshot.adapt(init, support, labels, steps=0).predict(support) == labels


def test_unbalanced_shots_map_each_label_to_its_own_prototype(init: fewshot.Initialization) -> None:
    counts = {"dog": 1, "cat": 3, "émeu": 7}
    labels = [name for name, n in counts.items() for _ in range(n)]
    order = np.random.default_rng(0).permutation(len(labels))
    labels = [labels[i] for i in order]
    support = random_images(len(labels), seed=4, dtype=torch.float32)

    model = fewshot.adapt(init, support, labels, steps=0)
    assert model.labels == list(dict.fromkeys(labels))
    features = embed(Conv4(TINY), init.params, support)
    for row, name in enumerate(model.labels):
        members = [i for i, label in enumerate(labels) if label == name]
        expected = 2 * features[members].mean(dim=0)
        torch.testing.assert_close(model.params["head.weight"][row], expected, atol=1e-5, rtol=0)

    adapted = fewshot.adapt(init, support, labels)
    assert adapted.predict_proba(support).shape == (11, 3)
    assert set(adapted.predict(support)) <= set(counts)


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (random_images(3, dtype=torch.float32), ["a", "a", "a"], "at least 2 distinct labels"),
        (random_images(3, dtype=torch.float32), ["a", "", "b"], "label 1 is empty"),
        (random_images(3, dtype=torch.float32), ["a", "  ", "b"], "label 1 is empty"),
        (random_images(3, dtype=torch.float32), ["a", "b"], "3 support images but 2 labels"),
        (
            random_images(3, dtype=torch.float32),
            ["a", "b", "c", "d"],
            "3 support images but 4 labels",
        ),
        (torch.rand(2, 3, 12, 12), ["a", "b"], r"shape \[B, 1, 12, 12\], got \[2, 3, 12, 12\]"),
        (torch.rand(2, 1, 28, 28), ["a", "b"], r"shape \[B, 1, 12, 12\]"),
        (torch.rand(1, 12, 12), ["a"], r"shape \[B, 1, 12, 12\]"),
        (torch.rand(0, 1, 12, 12), [], "support set is empty"),
    ],
)
def test_bad_episodes_raise_episode_error(
    init: fewshot.Initialization, images: torch.Tensor, labels: list[str], message: str
) -> None:
    with pytest.raises(fewshot.EpisodeError, match=message):
        fewshot.adapt(init, images, labels)


def test_bad_settings_and_queries_raise_episode_error(init: fewshot.Initialization) -> None:
    support = random_images(4, dtype=torch.float32)
    with pytest.raises(fewshot.EpisodeError, match="steps must be >= 0"):
        fewshot.adapt(init, support, ["a", "b", "a", "b"], steps=-1)
    with pytest.raises(fewshot.EpisodeError, match="mode must be"):
        fewshot.adapt(init, support, ["a", "b", "a", "b"], mode="all")  # type: ignore[arg-type]
    model = fewshot.adapt(init, support, ["a", "b", "a", "b"])
    with pytest.raises(fewshot.EpisodeError, match="query images must have shape"):
        model.predict_proba(torch.rand(2, 1, 28, 28))
    with pytest.raises(fewshot.EpisodeError, match="query set is empty"):
        model.predict(torch.rand(0, 1, 12, 12))
    assert issubclass(fewshot.EpisodeError, ValueError)
