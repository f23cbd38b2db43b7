"""What a request holds while it waits for a job: woken by the job's end, or left to poll."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager, suppress

# Ends heard recently, so a watch taken just after its job ended (a fast job, a request that
# registered late) starts with the answer instead of missing the notice.
RECENT_ENDS = 4096


class JobWatch:
    """Lets a request wait for a job: woken when a run ends (in this process, or by a Redis notice)."""

    def __init__(self, pushed: bool = False) -> None:
        self._pushed = pushed
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_event: asyncio.Event | None = None
        self._ended: str | None = None

    @property
    def pushed(self) -> bool:
        """True when the job's end wakes this watch, so polling is only a safety net."""
        return self._pushed

    @property
    def ended(self) -> str | None:
        """The terminal state the job was committed in, when its end was announced; else None."""
        return self._ended

    def notify(self, state: str | None = None) -> None:
        """Called when a run of the job ends (runner or notice thread): wakes sync and async waiters.

        `state` is the terminal state when the job itself ended (committed before the call);
        None when only a run ended and the row must be read again.
        """
        if state is not None:
            self._ended = state
        self._event.set()
        with self._lock:
            loop, event = self._loop, self._async_event
        if loop is not None and event is not None:
            # RuntimeError: the loop closed meanwhile, so nobody waits on it.
            with suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    def wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, returning early if the job's runner signals."""
        if not self._pushed:
            time.sleep(seconds)
        elif self._event.wait(seconds):
            self._event.clear()

    async def wait_async(self, seconds: float) -> None:
        """wait() on the event loop: no thread is held, and a signal wakes it at once."""
        if not self._pushed:
            await asyncio.sleep(seconds)
            return
        with self._lock:
            if self._async_event is None:
                self._loop = asyncio.get_running_loop()
                self._async_event = asyncio.Event()
            event = self._async_event
        if self._event.is_set():
            self._event.clear()
            event.clear()
            return
        try:
            await asyncio.wait_for(event.wait(), timeout=seconds)
        except TimeoutError:
            return
        event.clear()
        self._event.clear()


class Watches:
    """The watches of waiting requests by job id: held while they wait, all woken when it ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_job: dict[uuid.UUID, set[JobWatch]] = {}
        self._recent: OrderedDict[uuid.UUID, str] = OrderedDict()

    @contextmanager
    def watch(self, job_id: uuid.UUID, *, pushed: bool) -> Iterator[JobWatch]:
        """A watch on `job_id` for the duration of the block (already ended if heard so)."""
        watch = JobWatch(pushed=pushed)
        with self._lock:
            self._by_job.setdefault(job_id, set()).add(watch)
            ended = self._recent.get(job_id)
        if ended is not None and pushed:
            watch.notify(ended)
        try:
            yield watch
        finally:
            with self._lock:
                waiting = self._by_job.get(job_id)
                if waiting is not None:
                    waiting.discard(watch)
                    if not waiting:
                        del self._by_job[job_id]

    def notify(self, job_id: uuid.UUID, state: str | None = None) -> None:
        """Wake every watch on `job_id`; `state`: the terminal state it was committed in."""
        with self._lock:
            watches = list(self._by_job.get(job_id, ()))
            if state is not None:
                self._recent[job_id] = state
                while len(self._recent) > RECENT_ENDS:
                    self._recent.popitem(last=False)
        for watch in watches:
            watch.notify(state)
