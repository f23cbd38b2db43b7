"""Which queues a live worker consumes: each worker marks its queues in Redis with a TTL.

Celery's `inspect` broadcasts and waits for replies (seconds); a key per worker and queue that
expires unless renewed answers "does anyone consume `train`?" with one scan.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

KEY_PREFIX = "maml_serve:consumer"
# A mark outlives this many missed renewals.
TTL_FACTOR = 3

Announce = Callable[[Sequence[str], str, int], None]


def consumer_key(queue: str, worker: str) -> str:
    """The Redis key a worker sets while it consumes `queue` (`*` as worker: the scan pattern)."""
    return f"{KEY_PREFIX}:{queue}:{worker}"


def mark_ttl(every: float) -> int:
    """Seconds a mark lives when it is renewed every `every` seconds."""
    return max(1, math.ceil(every * TTL_FACTOR))


def mark_loop(
    announce: Announce, queues: Sequence[str], worker: str, every: float, stop: threading.Event
) -> None:
    """Mark `queues` as consumed by `worker` every `every` seconds until `stop` is set."""
    while not stop.is_set():
        try:
            announce(queues, worker, mark_ttl(every))
        except Exception:
            # Redis is down or frozen: the mark lapses and /readyz reports the queues unserved.
            log.warning("could not mark queues %s as consumed", ",".join(queues), exc_info=True)
        stop.wait(every)
