"""``LLM_RATE_LIMIT``: requests per API key (or client address), counted in ``LLM_RATE_LIMIT_STORAGE``.

With ``memory://`` every worker process counts on its own; with a shared storage (``redis://``,
``memcached://``, ``mongodb://``, anything the ``limits`` library takes) every worker and host that
uses it shares one count.

Under gevent the storage's I/O is cooperative: redis-py talks through the ``socket`` module, which
gevent's monkey patching (done by gunicorn's gevent worker) turns into greenlet switches, so a slow
storage delays only the requests waiting on it, never the hub. Redis gets short timeouts unless its
URI sets its own, and after a failure the storage is left alone for ``RETRY_AFTER_FAILURE`` seconds:
an unreachable storage costs one timeout per worker per second, not one per request.

When the storage fails the request is served unchecked (fail open, the default) or refused with
:class:`RateLimitUnavailable`; either way it is counted in ``llm_rate_limit_unchecked_total`` and
failures are logged at most once every ``LOG_INTERVAL`` seconds (with the number of requests they
touched), and the storage answering again after a logged failure gets one line: a flapping storage
costs two lines a minute, not one per request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from urllib.parse import parse_qs, urlsplit

from . import metrics
from .errors import RateLimited, RateLimitUnavailable

log = logging.getLogger("llm_blueprint")

REDIS_SCHEMES = {"redis", "rediss", "redis+unix", "valkey", "valkeys", "valkey+unix"}
# Seconds; a Redis on the same network answers in well under a millisecond.
REDIS_TIMEOUTS = {"socket_connect_timeout": 0.25, "socket_timeout": 0.25}
RETRY_AFTER_FAILURE = 1.0
LOG_INTERVAL = 60.0


def _public_address(uri: str) -> str:
    """The storage's scheme, host and port: never the password a URI may carry."""
    parts = urlsplit(uri)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return f"{parts.scheme}://{netloc}{parts.path if not netloc else ''}"


class RateLimit:
    """One limit (``limits`` notation, e.g. ``"60/minute"``) counted in one storage."""

    def __init__(self, limit: str, storage_uri: str = "memory://", fail_open: bool = True):
        from limits import parse, strategies
        from limits.storage import MovingWindowSupport, storage_from_string

        scheme = urlsplit(storage_uri).scheme
        given = parse_qs(urlsplit(storage_uri).query)
        options = {k: v for k, v in REDIS_TIMEOUTS.items() if k not in given} if scheme in REDIS_SCHEMES else {}
        # Built here (not per request) so that a wrong URI or a missing client library fails at start;
        # no storage connects before its first use.
        storage = storage_from_string(storage_uri, wrap_exceptions=True, **options)
        # Moving window where the storage has it (memory, Redis, MongoDB); Memcached has a sliding window counter.
        strategy = strategies.MovingWindowRateLimiter if isinstance(storage, MovingWindowSupport) \
            else strategies.SlidingWindowCounterRateLimiter
        self._limiter = strategy(storage)
        self._item = parse(limit)
        self.limit = limit
        self.storage = _public_address(storage_uri)
        self.fail_open = fail_open
        self._retry_at = 0.0  # monotonic time before which a failed storage is not asked again
        self._failing_since: float | None = None
        self._failure_logged = False  # the current failure has its line, its end gets one too
        self._next_log = 0.0
        self._unlogged = 0  # requests touched by the failure since its last log line

    def check(self, key: str) -> None:
        """Counts one request of ``key``; raises :class:`RateLimited` beyond the limit, and
        :class:`RateLimitUnavailable` when the storage fails and the limit fails closed."""
        from limits.errors import StorageError

        if time.monotonic() < self._retry_at:
            return self._unchecked(None)
        identity = hashlib.sha256(key.encode()).hexdigest()  # keys are never stored as they are
        try:
            allowed = self._limiter.hit(self._item, "llm", identity)
            reset = None if allowed else self._limiter.get_window_stats(self._item, "llm", identity).reset_time
        except StorageError as exc:
            self._retry_at = time.monotonic() + RETRY_AFTER_FAILURE
            return self._unchecked(exc.storage_error)
        if self._failing_since is not None and self._failure_logged:
            log.warning("rate limit storage %s answers again after %.0f s; %d requests went unchecked since the last line",
                        self.storage, time.monotonic() - self._failing_since, self._unlogged)
            self._unlogged, self._failure_logged = 0, False
        self._failing_since = None
        if reset is not None:
            raise RateLimited(self.limit, max(1, int(reset - time.time()) + 1))

    def _unchecked(self, error: Exception | None) -> None:
        action = "admitted" if self.fail_open else "refused"
        metrics.RATE_LIMIT_UNCHECKED.labels(action).inc()
        now = time.monotonic()
        self._unlogged += 1
        if self._failing_since is None:
            self._failing_since = now
        if error is not None and now >= self._next_log:
            log.error("rate limit storage %s failed (%s: %s); %d requests %s unchecked since the last line; "
                      "next line in %.0f s at the earliest", self.storage, type(error).__name__, error, self._unlogged,
                      action, LOG_INTERVAL)
            self._next_log, self._unlogged, self._failure_logged = now + LOG_INTERVAL, 0, True
        if not self.fail_open:
            raise RateLimitUnavailable(retry_after=max(1, round(RETRY_AFTER_FAILURE)))
