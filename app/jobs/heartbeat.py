"""A running job's heartbeat: renews its lease, carries progress, and says when to stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from app.jobs import state
from app.jobs.state import Claim

if TYPE_CHECKING:
    from app.core.runtime import Runtime

log = logging.getLogger(__name__)


class Heartbeat:
    """Renews the claim's lease every third of it on a thread, so a slow job is never re-run.

    `update` writes progress with a renewal; `lost` turns true once another attempt took the job
    over (this worker was presumed dead), and `cancelled` once someone asked to cancel it.
    """

    def __init__(self, runtime: Runtime, claim: Claim, stop: Callable[[], bool]) -> None:
        self.runtime = runtime
        self.claim = claim
        self.lost = False
        self.cancelled = False
        self._stop = stop
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._beat, daemon=True, name=f"heartbeat-{claim.job_id}"
        )

    def _renew(self, **values: Any) -> bool:
        with self._lock, self.runtime.sessions() as session:
            if not state.renew(session, self.claim, self.runtime.settings, **values):
                self.lost = True
            self.cancelled = state.cancel_requested(session, self.claim.job_id)
        return not self.lost

    def _beat(self) -> None:
        interval = state.lease_seconds(self.runtime.settings, self.claim.kind) / 3
        while not self._done.wait(interval):
            try:
                self._renew()
            except Exception:
                # A database outage: the next beat tries again; the lease covers two misses.
                log.exception("job %s: lease heartbeat failed", self.claim.job_id)

    def start(self) -> None:
        """Start renewing the lease in the background."""
        self._thread.start()

    def close(self) -> None:
        """Stop renewing."""
        self._done.set()

    def update(self, **values: Any) -> bool:
        """Write progress values with a lease renewal; False once the job was taken over."""
        return self._renew(**values)

    def should_stop(self) -> bool:
        """A cancel request, a lost lease or a shutdown of this process."""
        return self.cancelled or self.lost or self._stop()
