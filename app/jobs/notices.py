"""Job-end notices over Redis pub/sub: whoever ends a job publishes; API processes wake waiters.

Without them a request holding `?wait` on a Celery job polls the job row (each poll a database
read on the API's thread pool): 32 waiting clients kept an API process busy reading rows. A
notice names the job and the terminal state it was committed in ("<id hex> <state>", published
only after that commit), so the waiter needs no read; the row stays the truth for everything
else. A lost notice costs a waiter one safety re-read (`PUSHED_RECHECK_SECONDS`), and when Redis
is down waiters poll as before.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import uuid
from contextlib import AbstractContextManager, suppress
from typing import Any

from app.core.config import Settings
from app.jobs import state
from app.jobs.watch import JobWatch, Watches

log = logging.getLogger(__name__)

CHANNEL = "maml_serve:job_ended"
# Ended jobs waiting to be published; past this a burst drops notices (waiters re-read anyway).
MAX_PENDING = 10_000
# A frozen Redis is noticed by a PING this often on the subscriber's idle connection.
HEALTH_CHECK_SECONDS = 5
RECONNECT_SECONDS = 1.0


def _client(settings: Settings) -> Any:
    import redis

    if settings.broker_url is None:
        raise RuntimeError("job notices travel through Redis: set MAML_SERVE_BROKER_URL")
    timeout = settings.broker_timeout_seconds
    return redis.Redis.from_url(
        settings.broker_url.get_secret_value(),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=HEALTH_CHECK_SECONDS,
    )


def notice(job_id: uuid.UUID, ended: str) -> str:
    """The message for a job that ended in state `ended`: "<job id hex> <state>"."""
    return f"{job_id.hex} {ended}"


def parse_notice(data: bytes | str) -> tuple[uuid.UUID, str | None] | None:
    """(job id, terminal state) from a notice; the state is None in a bare-id notice (older
    publishers: the waiter reads the row); None for anything else."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    head, _, ended = text.partition(" ")
    try:
        job_id = uuid.UUID(head)
    except ValueError:
        return None
    if not ended:
        return job_id, None
    return (job_id, ended) if ended in state.TERMINAL_STATES else None


class EndPublisher:
    """Publishes the ids of ended jobs from its own thread: a slow Redis never holds a job."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._pending: queue.Queue[tuple[uuid.UUID, str] | None] = queue.Queue(MAX_PENDING)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="job-end-notices")
        self._thread.start()
        state.add_end_listener(self.ended)

    def ended(self, job_id: uuid.UUID, ended: str) -> None:
        """Queue a notice for `job_id` (called by app.jobs.state after the ending commit)."""
        with suppress(queue.Full):
            self._pending.put_nowait((job_id, ended))

    def _loop(self) -> None:
        client = None
        while True:
            item = self._pending.get()
            if item is None:
                return
            try:
                if client is None:
                    client = _client(self._settings)
                client.publish(CHANNEL, notice(*item))
            except Exception as exc:
                log.debug("could not publish the end of job %s: %s", item[0], exc)
                client = None

    def close(self) -> None:
        """Stop listening for ends and let the thread finish what is queued."""
        state.remove_end_listener(self.ended)
        try:
            self._pending.put_nowait(None)
        except queue.Full:
            return
        self._thread.join(timeout=2)


class EndSubscriber:
    """One thread per API process, subscribed to the notices, waking the watches of ended jobs."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._watches = Watches()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def listening(self) -> bool:
        """True while subscribed: new watches can rely on notices."""
        return self._listening.is_set()

    def watch(self, job_id: uuid.UUID) -> AbstractContextManager[JobWatch]:
        """A watch woken by the job's end notice (pushed), or a polling one while unsubscribed."""
        self.start()
        return self._watches.watch(job_id, pushed=self.listening)

    def start(self) -> None:
        """Subscribe from a background thread (once); watches are pushed once it listens."""
        with self._lock:
            if self._thread is not None or self._stop.is_set():
                return
            self._thread = threading.Thread(target=self._loop, daemon=True, name="job-end-watch")
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = _client(self._settings).pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    # Subscribed once the first read returned (a confirmation or a notice).
                    self._listening.set()
                    if message is not None and message.get("type") == "message":
                        self._notify(message["data"])
            except Exception as exc:
                self._listening.clear()
                log.debug("job-end notices unavailable (%s); waiters poll", exc)
                self._stop.wait(RECONNECT_SECONDS)
            finally:
                self._listening.clear()
                if pubsub is not None:
                    with suppress(Exception):
                        pubsub.close()

    def wait_listening(self, timeout: float) -> bool:
        """Block until subscribed or `timeout` seconds pass; True when listening."""
        return self._listening.wait(timeout)

    def _notify(self, data: bytes | str) -> None:
        parsed = parse_notice(data)
        if parsed is not None:
            self._watches.notify(*parsed)

    def close(self) -> None:
        """Stop the subscriber thread."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=3)


_process_publisher: EndPublisher | None = None
_process_publisher_pid = 0
_process_lock = threading.Lock()


def publish_ends_from_this_process(settings: Settings) -> None:
    """One publisher per worker process (a forked child builds its own: threads do not fork)."""
    global _process_publisher, _process_publisher_pid
    with _process_lock:
        if _process_publisher is not None and _process_publisher_pid == os.getpid():
            return
        if _process_publisher is not None:
            # The parent's, inherited through fork: its thread did not come along.
            state.remove_end_listener(_process_publisher.ended)
        _process_publisher = EndPublisher(settings)
        _process_publisher_pid = os.getpid()
