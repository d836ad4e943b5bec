"""The fetcher's errors and its retry policy: which failures of one ranged GET are worth another attempt.

One attempt = one HTTP request: the fetcher owns a private s3fs instance with the store's options,
s3fs ``retries = 1`` and botocore ``total_max_attempts = 1`` (``shards.stream.fetch.remote``), so
neither retries underneath us; left alone they nest to 25 requests over 47 s for a lasting 503 and
250 requests over 209 s for a lasting drop, at s3fs 2026.9. Two things remain underneath: s3fs still
sleeps 0.1 s after a failed attempt, and aiohttp resends a GET once, silently, when a kept-alive
connection closes without answering (RFC 9112 9.3.1), so an attempt is at most two requests. Up to
``retries`` attempts with full-jitter exponential backoff
(``uniform(0, min(max_backoff_s, backoff_s * 2**k))``, ``backoff_cap``) on:

- HTTP 5xx, 429 and the S3 codes SlowDown, ServiceUnavailable, InternalError, RequestTimeout,
  Throttling (s3fs 2026.9 raises ``OSError(EBUSY)`` for SlowDown/503, ``OSError(EREMOTEIO)`` for
  InternalError, ``TimeoutError`` for RequestTimeout, each with the botocore ``ClientError`` as
  ``__cause__``; the code is read from that ``ClientError``);
- connections dropped or reset (``botocore ConnectionClosedError`` from aiohttp
  ``ServerDisconnectedError``), timeouts (``botocore ReadTimeoutError`` / ``ConnectTimeoutError``
  from aiohttp ``SocketTimeoutError``), a body cut short (aiohttp ``ClientPayloadError``, raised
  as is), other ``OSError`` / ``ConnectionError`` / ``asyncio.TimeoutError``;
- a body shorter than asked for.

Not retried (``FetchError`` at once, naming the store URL and path): other 4xx such as NoSuchKey
(s3fs: ``FileNotFoundError``), AccessDenied/403 (``PermissionError``), InvalidRange.

Giving up: once the attempts are spent, or once ``give_up_s`` have passed since the first attempt
began (no attempt starts later than that), ``get`` raises ``StoreUnavailable`` (a ``FetchError``),
one line naming the endpoint, the object and the attempts: ``S3 endpoint http://host:port
unreachable after 8 attempts over 5.3 s reading s3://bucket/prefix/x.tar bytes a-b; last error:
...``. That is a network failure, never data corruption: the stream does not count it as a corrupt
sample (it stops). Bound on the time one ``get`` spends on a dead endpoint: the backoff sleeps
(at most ``sum(min(max_backoff_s, backoff_s * 2**k) for k < retries - 1)``: 5.15 s with the
defaults) plus the attempts themselves, each at most ``timeout_s`` (connect and read) plus the
0.1 s s3fs sleeps after a failure, and never more than ``give_up_s + timeout_s + 0.1`` s in all.
With the defaults (8 attempts, 0.05 s doubling to 2 s, 30 s timeouts, ``give_up_s`` 60): an
endpoint that refuses connections (server down) is given up on in about 6 s (5.15 s of sleeps at
most plus the refused attempts; 6.6 s seen on a loaded 2-core host); one that does not
answer at all (packets dropped) within 90.1 s. A body that is still short when the attempts are
spent (the object ends before the range: a truncated shard, bad bytes) raises ``TruncatedShard``
(a ``FetchError``) instead, as does a local file that ends early.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import http.client
from collections.abc import Iterator

RETRY_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                         "ThrottlingException", "TooManyRequests"})
_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class FetchError(IOError):
    """A chunk could not be fetched: a permanent error, or transient ones ``retries`` times."""


class StoreUnavailable(FetchError):
    """The S3 endpoint did not serve a chunk within the retry policy (network errors, timeouts,
    5xx/SlowDown): an outage, not corruption. ``endpoint``, ``url`` (the object), ``attempts``,
    ``elapsed_s`` and ``last`` (the last error) say what happened."""

    def __init__(self, message: str = "", *, endpoint: str = "", url: str = "", attempts: int = 0,
                 elapsed_s: float = 0.0, last: str = ""):
        super().__init__(message)
        self.endpoint, self.url, self.attempts, self.elapsed_s, self.last = endpoint, url, attempts, elapsed_s, last


class TruncatedShard(FetchError):
    """The object ends before the chunk's byte range: the store's bytes are bad (counted as a corrupt
    sample by the stream), not the network."""


def again(e: BaseException) -> FetchError:
    """A fresh exception of the same kind for another waiter of a failed fetch (a FetchError keeps its
    class and attributes; anything else becomes a FetchError)."""
    if isinstance(e, FetchError):
        return copy.copy(e)
    return FetchError(str(e))


def backoff_cap(attempt: int, backoff_s: float, max_backoff_s: float) -> float:
    """The longest sleep before attempt ``attempt`` (1 = the first retry): full jitter sleeps
    uniformly in ``[0, backoff_cap)``."""
    return min(max_backoff_s, backoff_s * 2 ** (attempt - 1))


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _client_error(e: BaseException):
    try:
        from botocore.exceptions import ClientError
    except ImportError:  # pragma: no cover - s3fs always brings botocore
        return None
    return next((x for x in _chain(e) if isinstance(x, ClientError)), None)


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """The exception types of a transient failure. The S3 client libraries are imported on the first
    failure, not with this module: a local store never needs them."""
    retryable: tuple = (OSError, ConnectionError, TimeoutError, asyncio.TimeoutError, http.client.HTTPException)
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError, ResponseStreamingError
        retryable += (BotoConnectionError, HTTPClientError, IncompleteReadError, ResponseStreamingError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import aiohttp
        retryable += (aiohttp.ClientError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError
        retryable += (FSTimeoutError,)
    except ImportError:  # pragma: no cover
        pass
    return retryable


def is_retryable(e: BaseException) -> bool:
    """Whether an error of one ranged GET is worth another attempt (see the module docstring)."""
    ce = _client_error(e)
    if ce is not None:
        err = ce.response.get("Error", {}) or {}
        status = int((ce.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode") or 0)
        code = str(err.get("Code", ""))
        return code in RETRY_CODES or status >= 500 or status == 429 or code.isdigit() and int(code) >= 500
    if isinstance(e, FetchError) or isinstance(e, _PERMANENT_OS):
        return False
    return isinstance(e, _transient_types())


def describe(e: BaseException) -> str:
    """One line for an error of one attempt: the S3 code and HTTP status when there is one."""
    ce = _client_error(e)
    if ce is not None:
        err = ce.response.get("Error", {}) or {}
        status = (ce.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
        return f"{err.get('Code', '?')} (HTTP {status}): {err.get('Message', '')}".rstrip(": ")
    return f"{type(e).__name__}: {e}"
