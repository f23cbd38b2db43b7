"""Seeded N-way K-shot episode sampling, batched so a meta-batch stacks under vmap."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fewshot.data import ImageDataset
from fewshot.errors import EpisodeError


@dataclass
class EpisodeBatch:
    """T tasks of one shape: support [T, N*K, C, H, W] / [T, N*K], query [T, N*Q, C, H, W] / [T, N*Q]."""

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    ways: int
    shots: int


class EpisodeSampler:
    """Draws N-way K-shot Q-query tasks from an ImageDataset.

    With `rotations`, each class also appears rotated by 90, 180 and 270 degrees as three new
    classes (Santoro et al. 2016; Finn et al. 2017), for meta-training. With `within_group`,
    a task's classes all come from one group (Lake et al. 2015's within-alphabet runs).
    With `shift` > 0, every image is translated by up to `shift` pixels each way (zero fill),
    a regulariser against overfitting the meta-training alphabets.
    Images are kept as float on `device` so sampling costs one gather.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        rotations: bool = False,
        within_group: bool = False,
        shift: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        self.images = dataset.images.to(device).float().div_(255.0)
        self.rotations = rotations
        # Each rotation of a class is a class of its own.
        self.multiplier = 4 if rotations else 1
        self.within_group = within_group
        self.shift = shift
        self.device = torch.device(device)
        n_classes = len(dataset.classes)
        counts = torch.bincount(dataset.targets, minlength=n_classes)
        self.counts = counts.numpy()
        width = int(counts.max()) if n_classes else 0
        table = torch.full((n_classes, width), -1, dtype=torch.long)
        order = torch.argsort(dataset.targets, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        for c in range(n_classes):
            table[c, : counts[c]] = order[starts[c] : starts[c] + counts[c]]
        self.table = table.numpy()
        groups = np.array(dataset.groups)
        self.group_classes = [np.flatnonzero(groups == g) for g in sorted(set(dataset.groups))]

    def _classes(self, rng: np.random.Generator, ways: int, needed: int) -> np.ndarray:
        eligible_mask = self.counts >= needed
        multiplier = self.multiplier
        if self.within_group:
            pools = [g[eligible_mask[g]] for g in self.group_classes]
            pools = [p for p in pools if p.size * multiplier >= ways]
            if not pools:
                raise EpisodeError(f"no group has {ways} classes with {needed} images each")
            pool = pools[rng.integers(len(pools))]
        else:
            pool = np.flatnonzero(eligible_mask)
        if pool.size * multiplier < ways:
            raise EpisodeError(
                f"{ways}-way tasks need {ways} classes with >= {needed} images; {pool.size} have"
            )
        picks = rng.choice(pool.size * multiplier, size=ways, replace=False)
        return np.stack([pool[picks % pool.size], picks // pool.size], axis=1)

    def _draw(
        self, rng: np.random.Generator, tasks: int, ways: int, shots: int, queries: int
    ) -> tuple[Tensor, np.ndarray]:
        # Dataset indices [T*N, K+Q] of each task's classes' images, and each class's turns.
        if ways < 2 or shots < 1 or queries < 1:
            raise EpisodeError(
                f"need ways >= 2, shots >= 1, queries >= 1; got {ways}, {shots}, {queries}"
            )
        per_class = shots + queries
        chosen = np.concatenate([self._classes(rng, ways, per_class) for _ in range(tasks)])
        classes, turns = chosen[:, 0], chosen[:, 1]
        scores = rng.random((classes.size, self.table.shape[1]))
        scores[self.table[classes] < 0] = np.inf
        columns = np.argsort(scores, axis=1)[:, :per_class]
        index = np.take_along_axis(self.table[classes], columns, axis=1)
        return torch.from_numpy(index).to(self.device), turns

    def sample_indices(
        self, rng: np.random.Generator, tasks: int, ways: int, shots: int, queries: int
    ) -> tuple[Tensor, Tensor]:
        """The dataset indices of the tasks sample() draws from the same rng state: support
        [T, N*K] and query [T, N*Q] (images unrotated and unshifted, so no rotations or shift)."""
        if self.rotations or self.shift > 0:
            raise EpisodeError("indices name the images as stored: no rotations or shifts")
        index, _ = self._draw(rng, tasks, ways, shots, queries)
        index = index.view(tasks, ways, shots + queries)
        support = index[:, :, :shots].reshape(tasks, ways * shots)
        return support, index[:, :, shots:].reshape(tasks, ways * queries)

    def sample(
        self, rng: np.random.Generator, tasks: int, ways: int, shots: int, queries: int
    ) -> EpisodeBatch:
        """Draw `tasks` tasks of `ways` classes with `shots` support and `queries` query images each."""
        per_class = shots + queries
        index, turns = self._draw(rng, tasks, ways, shots, queries)
        images = self.images[index]  # [T*N, K+Q, C, H, W]
        if self.rotations:
            turns_t = torch.from_numpy(turns).to(self.device)
            for k in (1, 2, 3):
                mask = turns_t == k
                if bool(mask.any()):
                    images[mask] = torch.rot90(images[mask], k, dims=(-2, -1))
        if self.shift > 0:
            flat = images.flatten(0, 1)
            offsets = torch.from_numpy(rng.integers(0, 2 * self.shift + 1, size=(flat.shape[0], 2)))
            images = random_shift(flat, self.shift, offsets.to(self.device)).view_as(images)
        shape = images.shape[2:]
        images = images.view(tasks, ways, per_class, *shape)
        labels = torch.arange(ways, device=self.device)
        support = images[:, :, :shots].reshape(tasks, ways * shots, *shape)
        query = images[:, :, shots:].reshape(tasks, ways * queries, *shape)
        return EpisodeBatch(
            support_x=support,
            support_y=labels.repeat_interleave(shots).expand(tasks, -1).contiguous(),
            query_x=query,
            query_y=labels.repeat_interleave(queries).expand(tasks, -1).contiguous(),
            ways=ways,
            shots=shots,
        )


def random_shift(images: Tensor, shift: int, offsets: Tensor) -> Tensor:
    """Translate each image [B, C, H, W] by offsets [B, 2] (dy, dx in 0..2*shift) minus `shift`.

    Zero padding by `shift`, then a per-image crop back to H x W, in one gather.
    """
    batch, channels, height, width = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    device = images.device
    rows = offsets[:, 0, None] + torch.arange(height, device=device)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(width, device=device)  # [B, W]
    return padded[
        torch.arange(batch, device=device)[:, None, None, None],
        torch.arange(channels, device=device)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
