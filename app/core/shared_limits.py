"""Key rates and failed-attempt counts kept in Redis, so every API process counts the same ones.

Counted with the `limits` library (sliding-window counters, its async Redis storage on redis-py),
on the event loop, before the key is looked up. When Redis does not answer within
`rate_limit_timeout_seconds`, the process falls back to its own in-memory limits (the embedded
default's) for `rate_limit_retry_seconds` and then tries Redis again: a Redis outage degrades the
limits to per process, never fails a request and costs one short timeout per retry period.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from app.core import metrics

if TYPE_CHECKING:
    from app.core.config import Settings

log = logging.getLogger(__name__)
_PREFIX = "maml_serve:limits"


def rate_window(rate: float, burst: int) -> tuple[int, int]:
    """(requests, seconds) of the sliding window that matches a token bucket's rate and burst."""
    seconds = max(1, math.ceil(burst / rate))
    return max(1, min(burst, math.floor(rate * seconds))), seconds


class SharedCounters:
    """Hits against Redis-held windows; None from a call means "Redis is unavailable now"."""

    def __init__(self, settings: Settings) -> None:
        # Imported now, on the thread that builds the app: limits reads redis.__version__ when
        # it first makes a storage, and a module another thread is still importing then has
        # none (seen once as a ConfigurationError in a serve process).
        import limits.aio.storage  # noqa: F401
        import redis.asyncio  # noqa: F401
        from limits import RateLimitItemPerMinute, RateLimitItemPerSecond

        if settings.broker_url is None:
            raise ValueError("shared rate limits need MAML_SERVE_BROKER_URL (a Redis URL)")
        self._url = "async+" + settings.broker_url.get_secret_value()
        self._timeout = settings.rate_limit_timeout_seconds
        self._retry = settings.rate_limit_retry_seconds
        amount, seconds = rate_window(settings.key_rate_per_second, settings.key_rate_burst)
        self.key_rate = RateLimitItemPerSecond(amount, seconds)
        self.failed_auth = RateLimitItemPerMinute(settings.max_failed_auth_per_minute)
        self._limiter: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._down_until = 0.0

    def _strategy(self) -> Any:
        # redis.asyncio connections belong to the loop that made them: one client per loop.
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._loop is not loop:
            from limits.aio.storage import RedisStorage
            from limits.aio.strategies import SlidingWindowCounterRateLimiter

            storage = RedisStorage(
                self._url,
                implementation="redispy",
                wrap_exceptions=True,
                key_prefix=_PREFIX,
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
            )
            self._limiter, self._loop = SlidingWindowCounterRateLimiter(storage), loop
        return self._limiter

    async def _call(self, method: str, item: Any, identifier: str) -> Any:
        if time.monotonic() < self._down_until:
            return None
        try:
            async with asyncio.timeout(self._timeout * 2):
                result = await getattr(self._strategy(), method)(item, identifier)
        except Exception as exc:
            self._down_until = time.monotonic() + self._retry
            self._limiter = None
            metrics.RATE_LIMITS_DEGRADED.inc()
            log.warning("rate limits: Redis unavailable (%s: %s); per-process limits for %.0f s",
                        type(exc).__name__, exc, self._retry)  # fmt: skip
            return None
        return result

    async def hit(self, item: Any, identifier: str) -> bool | None:
        """Count one request; False when over the limit, None when Redis is unavailable."""
        result = await self._call("hit", item, identifier)
        return None if result is None else bool(result)

    async def allowed(self, item: Any, identifier: str) -> bool | None:
        """Whether one more request would be within the limit (counts nothing)."""
        result = await self._call("test", item, identifier)
        return None if result is None else bool(result)

    async def retry_after(self, item: Any, identifier: str) -> float:
        """Seconds until the window has room again (1 when it cannot be known)."""
        stats = await self._call("get_window_stats", item, identifier)
        if stats is None:
            return 1.0
        return max(1.0, float(stats.reset_time) - time.time())
