"""Per-key request rate and in-flight limits, and a throttle on failed key attempts per address.

The in-flight count protects one process's threads and connections, so it is kept per process.
Rates and failed attempts are shared by every API process through Redis when a broker is
configured (app.core.shared_limits); the in-memory counters here are the embedded default's and
the fallback while Redis is unavailable.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from app.core.config import Settings
from app.core.errors import ProblemError

if TYPE_CHECKING:
    from app.core.shared_limits import SharedCounters

# Addresses remembered by the failed-attempt throttle before expired windows are swept.
_SWEEP_AT = 10_000
_WINDOW_SECONDS = 60.0


class TooManyRequests(ProblemError):
    """A limit on how much one key or one address may ask for was reached (429)."""

    status = 429
    code = "rate_limited"

    def __init__(self, detail: str, *, code: str, retry_after: float) -> None:
        super().__init__(
            detail, code=code, headers={"Retry-After": str(max(1, math.ceil(retry_after)))}
        )


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    in_flight: int = 0


@dataclass
class KeyLimits:
    """A token bucket (rate and burst) and a count of requests in flight, per API key (by the
    key's hash, so a request can be counted before the key is looked up)."""

    rate: float
    burst: int
    max_in_flight: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, key: str, *, count_rate: bool = True) -> None:
        """Count one request of the key in flight, or raise 429 when it is over a limit.

        count_rate False: the rate is counted elsewhere (shared), only the in-flight cap here.
        """
        now = time.monotonic()
        with self._lock:
            if key not in self._buckets and len(self._buckets) >= _SWEEP_AT:
                self._sweep(now)
            bucket = self._buckets.setdefault(key, _Bucket(float(self.burst), now))
            bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.stamp) * self.rate)
            bucket.stamp = now
            if bucket.in_flight >= self.max_in_flight:
                raise TooManyRequests(
                    f"this API key already has {self.max_in_flight} requests in progress; "
                    "wait for one to finish",
                    code="too_many_requests",
                    retry_after=1,
                )
            if count_rate and bucket.tokens < 1.0:
                raise TooManyRequests(
                    f"this API key is over {self.rate:g} requests per second "
                    f"(bursts of {self.burst}); slow down",
                    code="rate_limited",
                    retry_after=(1.0 - bucket.tokens) / self.rate,
                )
            if count_rate:
                bucket.tokens -= 1.0
            bucket.in_flight += 1

    def _sweep(self, now: float) -> None:
        # Idle buckets (nothing in flight, refilled) hold nothing worth remembering; unknown keys
        # sprayed at the service would otherwise grow the table without bound.
        self._buckets = {
            key: b
            for key, b in self._buckets.items()
            if b.in_flight or b.tokens + (now - b.stamp) * self.rate < self.burst
        }

    def release(self, key: str) -> None:
        """The request admitted for this key has ended."""
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is not None and bucket.in_flight > 0:
                bucket.in_flight -= 1


@dataclass
class FailedAuthThrottle:
    """Counts failed key attempts per client address in one-minute windows."""

    per_minute: int
    _windows: dict[str, tuple[float, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def refusal(self, retry_after: float) -> TooManyRequests:
        """The 429 for an address over the limit."""
        return TooManyRequests(
            f"too many requests with an invalid API key from this address (at most "
            f"{self.per_minute} a minute); check the key and try again later",
            code="too_many_failed_attempts",
            retry_after=retry_after,
        )

    def check(self, address: str) -> None:
        """Raise 429 when this address failed too often in the current window."""
        now = time.monotonic()
        with self._lock:
            start, count = self._windows.get(address, (now, 0))
        if now - start < _WINDOW_SECONDS and count >= self.per_minute:
            raise self.refusal(_WINDOW_SECONDS - (now - start))

    def record_failure(self, address: str) -> None:
        """Count one failed attempt of this address."""
        now = time.monotonic()
        with self._lock:
            if len(self._windows) >= _SWEEP_AT:
                self._windows = {
                    a: w for a, w in self._windows.items() if now - w[0] < _WINDOW_SECONDS
                }
                # Still full: addresses sprayed faster than they expire. Forgetting them costs
                # nothing a sprayer could not get by switching address anyway.
                if len(self._windows) >= _SWEEP_AT:
                    self._windows.clear()
            start, count = self._windows.get(address, (now, 0))
            if now - start >= _WINDOW_SECONDS:
                start, count = now, 0
            self._windows[address] = (start, count + 1)


def _over_rate(keys: KeyLimits, retry_after: float) -> TooManyRequests:
    return TooManyRequests(
        f"this API key is over {keys.rate:g} requests per second (bursts of {keys.burst}); "
        "slow down",
        code="rate_limited",
        retry_after=retry_after,
    )


@dataclass(frozen=True)
class Limits:
    """The process's request limits: in memory, and in Redis when `shared` is set."""

    keys: KeyLimits
    failed_auth: FailedAuthThrottle
    shared: SharedCounters | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        """Limits as configured (shared through the broker's Redis when there is one)."""
        shared = None
        if settings.shared_rate_limits and settings.broker_url is not None:
            from app.core.shared_limits import SharedCounters

            shared = SharedCounters(settings)
        return cls(
            keys=KeyLimits(
                rate=settings.key_rate_per_second,
                burst=settings.key_rate_burst,
                max_in_flight=settings.key_max_in_flight,
            ),
            failed_auth=FailedAuthThrottle(per_minute=settings.max_failed_auth_per_minute),
            shared=shared,
        )

    async def check_address(self, address: str) -> None:
        """429 when this address failed to authenticate too often this minute."""
        if self.shared is not None:
            allowed = await self.shared.allowed(self.shared.failed_auth, f"auth:{address}")
            if allowed is not None:
                if not allowed:
                    raise self.failed_auth.refusal(
                        await self.shared.retry_after(self.shared.failed_auth, f"auth:{address}")
                    )
                return
        self.failed_auth.check(address)

    async def record_failure(self, address: str) -> None:
        """Count one failed key attempt of this address."""
        shared = self.shared
        if (
            shared is not None
            and await shared.hit(shared.failed_auth, f"auth:{address}") is not None
        ):
            return
        self.failed_auth.record_failure(address)

    async def admit_key(self, token: str) -> None:
        """Count one request of a key (by its hash) in flight and against its rate, or 429."""
        if self.shared is None:
            self.keys.admit(token)
            return
        allowed = await self.shared.hit(self.shared.key_rate, f"key:{token}")
        if allowed is False:
            raise _over_rate(
                self.keys, await self.shared.retry_after(self.shared.key_rate, f"key:{token}")
            )
        # None: Redis is unavailable, the process's own bucket counts the rate meanwhile.
        self.keys.admit(token, count_rate=allowed is None)

    def release_key(self, token: str) -> None:
        """The key's request has ended."""
        self.keys.release(token)
