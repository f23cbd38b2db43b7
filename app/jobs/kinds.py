"""Every kind of job in one table: its Celery task name, its queue, its lease and its handler.

Handlers are named by import path and resolved when a job first runs, so this table imports no
domain module and every module may read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.core.config import Settings


@dataclass(frozen=True)
class Kind:
    """How one kind of job is sent and run."""

    name: str
    task_name: str
    queue: str
    # The Settings attribute that holds this kind's lease, in seconds.
    lease_setting: str
    handler: str

    def lease_seconds(self, settings: Settings) -> float:
        """How long a claim holds before the job counts as abandoned (renewed by the heartbeat)."""
        return float(getattr(settings, self.lease_setting))


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "adapt",
            "maml_serve.adapt",
            "adapt",
            "job_lease_seconds",
            "app.adaptations.handler:run_adapt",
        ),
        Kind(
            "meta_train",
            "maml_serve.meta_train",
            "train",
            "train_lease_seconds",
            "app.meta_training.handler:run_meta_train",
        ),
    )
}
# Predictions run in the API processes, next to the decoded images and the byte-bounded model
# cache (docs/operations/scale-out.md); workers take adaptations and meta-training only.
QUEUES = ("adapt", "train")


def kind_of(name: str) -> Kind | None:
    """The kind called `name`, or None for a kind this version does not know."""
    return KINDS.get(name)


@cache
def handler_of(kind: Kind) -> Callable[..., Any]:
    """Import and return the function that runs jobs of this kind."""
    module, _, attribute = kind.handler.partition(":")
    handler: Callable[..., Any] = getattr(importlib.import_module(module), attribute)
    return handler
