"""ChunkFetcher: byte-exact ranged reads from a local store and from a real S3 server (moto), through
a proxy that injects 503 SlowDown, dropped connections, delays and cut bodies."""

import gc
import hashlib
import multiprocessing as mp
import pickle
import threading
import time

import pytest

from shards.store import Store
from shards.stream.fetch import ChunkFetcher, FetchError, StoreUnavailable, is_retryable
from shards.stream.fetch.cache import ByteCache
from shards.stream.fetch.config import FetchStats
from shards.stream.fetch.window import ReadAhead
from tests.shards.test_shard_store import ephys_record, write_record
from tests.support.faulty_proxy import FaultyProxy


def _stores(tmp_path, bucket):
    """A local store with a few shards, the same files uploaded to s3://bucket/prefix; the chunk rows."""
    local = Store(str(tmp_path / "local"))
    rows = []
    for seed, sid in enumerate(["sess-a", "sess-b"]):
        rec = ephys_record(seed=seed, dur=200.0)
        rec.session_id = sid
        rows += write_record(local, rec, target_bytes=20_000).chunk_rows
    remote = Store(f"s3://{bucket}/prefix")
    for rel in local.list("", ".tar"):
        remote.write_bytes(rel, local.read_bytes(rel))
    items = [(r["path"], r["offset"], r["length"]) for r in rows]
    expected = {it: local.read_range(it[0], it[1], it[1] + it[2]) for it in items}
    assert len(items) >= 30 and len({p for p, _, _ in items}) > 3
    return local, remote, items, expected


@pytest.fixture
def stores(tmp_path, s3_bucket):
    return _stores(tmp_path, s3_bucket)


def test_every_chunk_from_s3_equals_the_local_bytes_with_and_without_prefetch(stores):
    local, remote, items, expected = stores
    with ChunkFetcher(remote, threads=4) as f:  # no prefetch: every get is a GET of its own
        assert [f.get(*it) for it in items] == [expected[it] for it in items]
        assert f.stats["misses"] == len(items) and f.threads_alive == 0
    with ChunkFetcher(remote, threads=4, prefetch_depth=8) as f:
        f.prefetch(items)
        assert [f.get(*it) for it in items] == [expected[it] for it in items]
        s = f.stats
        assert s["prefetched"] > 0 and s["hits"] > 0 and s["hits"] + s["misses"] == len(items)
        assert s["bytes_fetched"] == sum(it[2] for it in items) and s["retries"] == 0
        with pytest.raises(ValueError):  # not (path, offset, length): said at once, not in a thread
            f.prefetch([("a.tar", 0)])
    with ChunkFetcher(local) as f:  # local: read in place
        f.prefetch(items)
        assert [f.get(*it) for it in items] == [expected[it] for it in items]


def test_faults_injected_by_the_proxy_are_retried_and_bytes_stay_identical(stores, s3_server, monkeypatch):
    _, remote, items, expected = stores
    with FaultyProxy(s3_server, every_503=3, every_drop=5, delay_every=7, delay_s=0.2, every_truncate=11) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        via_proxy = Store(remote.uri)
        with ChunkFetcher(via_proxy, threads=4, prefetch_depth=16, backoff_s=0.01, max_backoff_s=0.1) as f:
            f.prefetch(items)
            got = [f.get(*it) for it in items]
            stats = f.stats
        counts = proxy.counts
    assert got == [expected[it] for it in items]
    assert all(counts[k] > 0 for k in ("slowdown", "dropped", "delayed", "truncated")), counts
    # each 503 and cut body cost one of our attempts; a drop on a kept-alive connection is
    # retried once inside aiohttp (RFC 9112 9.3.1) and may not reach our counter
    assert stats["retries"] >= counts["slowdown"] + counts["truncated"] > 0


def test_a_response_slower_than_the_timeout_is_retried(stores, s3_server, monkeypatch):
    _, remote, items, expected = stores
    with FaultyProxy(s3_server, delay_every=2, delay_s=1.5) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with ChunkFetcher(Store(remote.uri), timeout_s=0.4, backoff_s=0.01) as f:
            assert [f.get(*it) for it in items[:4]] == [expected[it] for it in items[:4]]
            assert f.stats["retries"] >= 2
        assert proxy.counts["delayed"] >= 2


def test_persistent_slowdown_gives_up_after_the_configured_attempts(stores, s3_server, monkeypatch):
    _, remote, items, _ = stores
    with FaultyProxy(s3_server, every_503=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with ChunkFetcher(Store(remote.uri), retries=3, backoff_s=0.01) as f:
            with pytest.raises(StoreUnavailable, match=r"S3 endpoint http://127.0.0.1:\d+ unreachable after 3 "
                                                       r"attempts over [\d.]+ s reading s3://.*SlowDown") as info:
                f.get(*items[0])
            assert f.stats["retries"] == 2
        assert proxy.counts["requests"] == 3  # one HTTP request per attempt: s3fs/botocore retry nothing
    assert remote.url(items[0][0]) in str(info.value) and proxy.url in str(info.value)
    assert info.value.attempts == 3 and info.value.endpoint == proxy.url


def test_dropped_connections_are_retried_a_bounded_number_of_times(stores, s3_server, monkeypatch):
    _, remote, items, _ = stores
    with FaultyProxy(s3_server, every_drop=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with ChunkFetcher(Store(remote.uri), retries=3, backoff_s=0.01) as f:
            with pytest.raises(StoreUnavailable, match=r"unreachable after 3 attempts.*ConnectionClosedError"):
                f.get(*items[0])
            assert f.stats["retries"] == 2
        assert 3 <= proxy.counts["requests"] <= 6  # at most aiohttp's one silent retry per attempt


def test_a_missing_key_raises_at_once_naming_it(stores, s3_server, monkeypatch):
    _, remote, _, _ = stores
    with FaultyProxy(s3_server) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with ChunkFetcher(Store(remote.uri), retries=8, backoff_s=1.0) as f:
            with pytest.raises(FetchError, match=r"s3://.*/prefix/no/such\.tar.*NoSuchKey.*not retried"):
                f.get("no/such.tar", 0, 100)
            f.prefetch([("no/such.tar", 0, 10)])  # a failed prefetch surfaces on get, also at once
            with pytest.raises(FetchError, match="no/such.tar"):
                f.get("no/such.tar", 0, 10)
            assert f.stats["retries"] == 0  # no backoff sleeps: the server saw one request per get
        assert proxy.counts["requests"] == 2
    with pytest.raises(FetchError, match="no/such.tar"):
        ChunkFetcher(Store(str(remote.uri).replace("s3://", "/tmp/not-a-store-"))).get("no/such.tar", 0, 10)


def test_a_small_cache_evicts_lru_and_never_exceeds_its_cap(stores):
    _, remote, items, expected = stores
    cap = 3 * max(it[2] for it in items)
    with ChunkFetcher(remote, cache_bytes=cap, threads=4, prefetch_depth=16) as f:
        f.prefetch(items + items[:5])  # read twice: the second time from the cache if still there
        for it in items + items[:5]:
            assert f.get(*it) == expected[it]
            assert f.get(*it) == expected[it]  # just used: a hit
        s = f.stats
    assert s["evictions"] > 0 and 0 < s["max_cache_bytes"] <= cap and s["cache_bytes"] <= cap
    assert s["hits"] >= len(items) + 5


def test_close_drops_the_cache_and_stops_the_threads(stores):
    _, remote, items, expected = stores
    f = ChunkFetcher(remote, threads=3)
    f.prefetch(items)
    assert f.get(*items[0]) == expected[items[0]]
    assert f.threads_alive == 3 and f.stats["cache_bytes"] > 0
    f.close()
    assert f.threads_alive == 0 and f.stats["cache_bytes"] == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("chunk-fetch-")]
    with pytest.raises(FetchError, match="closed"):
        f.get(*items[0])
    f.close()  # idempotent


def test_a_fetcher_dropped_without_close_stops_its_threads(stores):
    _, remote, items, _ = stores
    f = ChunkFetcher(remote, threads=2)
    f.prefetch(items)
    f.get(*items[0])
    del f
    gc.collect()
    deadline = time.monotonic() + 5
    while [t for t in threading.enumerate() if t.name.startswith("chunk-fetch-")] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith("chunk-fetch-")]


def test_pickled_fetcher_carries_only_its_config(stores):
    _, remote, items, expected = stores
    with ChunkFetcher(remote, threads=2) as f:
        f.prefetch(items)
        f.get(*items[0])
        g = pickle.loads(pickle.dumps(f))
    assert g.threads_alive == 0 and g.stats["hits"] == 0
    with g:
        assert g.get(*items[1]) == expected[items[1]]


def _child(fetcher, items, q):
    try:
        fetcher.prefetch(items)
        q.put([hashlib.sha256(fetcher.get(*it)).hexdigest() for it in items] + [fetcher.threads_alive])
        fetcher.close()
    except BaseException as e:  # noqa: BLE001
        q.put(repr(e))


def _run_in_forked_worker(stores, used_in_parent):
    _, remote, items, expected = stores
    f = ChunkFetcher(remote, threads=2)
    if used_in_parent:  # threads and an s3 client already exist in the parent when it forks
        f.prefetch(items)
        f.get(*items[0])
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(f, items, q))
    p.start()
    out = q.get(timeout=60)
    p.join(10)
    assert isinstance(out, list), out
    assert out[:-1] == [hashlib.sha256(expected[it]).hexdigest() for it in items] and out[-1] == 2
    assert p.exitcode == 0
    if used_in_parent:
        assert f.get(*items[1]) == expected[items[1]] and f.threads_alive == 2
    f.close()


def test_forked_worker_creates_its_own_fetcher(stores):  # the DataLoader way: first use in the worker
    _run_in_forked_worker(stores, used_in_parent=False)


def test_forked_worker_after_the_parent_used_it(stores):  # parent's threads/client are not inherited
    _run_in_forked_worker(stores, used_in_parent=True)


def test_the_proxy_without_faults_is_transparent(s3_bucket, s3_server, monkeypatch):
    with FaultyProxy(s3_server, methods=("GET", "HEAD", "PUT", "POST", "DELETE")) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = Store(f"s3://{s3_bucket}/x")
        blob = bytes(range(256)) * 4096
        store.write_bytes("a/b.tar", blob)
        assert store.list("", ".tar") == ["a/b.tar"] and store.size("a/b.tar") == len(blob)
        assert store.read_bytes("a/b.tar") == blob and store.read_range("a/b.tar", 5, 9) == blob[5:9]
        store.remove("a/b.tar")
        assert not store.exists("a/b.tar")
        assert proxy.counts["requests"] >= 6 and proxy.counts["requests"] == proxy.counts["forwarded"]


def test_the_read_ahead_window_follows_reordered_and_skipped_reads():
    """The plan window alone (no threads, no S3): a batch read in another order than planned does not
    jump the window to a later occurrence of a chunk, and items never read are passed, not waited on."""
    window, cache = ReadAhead(depth=4), ByteCache(1000, FetchStats())
    k = [("s.tar", i * 10, 10) for i in range(12)]
    plan = [k[0], k[1], k[2], k[3], k[0], k[4], k[5], k[6], k[7], k[8], k[9], k[10]]
    issued = []

    def background():  # what the threads do, completed at once
        while (key := window.next_fetch(1000, lambda planned: planned in cache)) is not None:
            issued.append(key)
            cache.insert(key, b"x" * 10, window.pins)

    def read(key):  # what get() does to the window
        window.pull()
        window.consume(key)

    window.add(plan)
    background()
    assert issued == k[:4]
    for key in (k[1], k[0], k[3], k[2]):  # one batch, read in another order than planned
        read(key)
    assert [slot.key for slot in window.slots][:1] == [k[0]]  # the window stayed at plan[4], it did not jump
    background()
    assert issued == k[:7]
    read(k[5])  # plan[4] (k0) and k4 are never read (e.g. served by a cache upstream)
    background()
    assert issued == k[:10] and window.pinned_bytes == 10 * len(window.pins) <= 1000


def test_the_byte_cache_keeps_its_cap_and_never_evicts_a_pinned_chunk():
    stats = FetchStats()
    cache = ByteCache(30, stats)
    a, b, c, d = [("s.tar", i * 10, 10) for i in range(4)]
    for key in (a, b, c):
        cache.insert(key, b"x" * 10, pinned={})
    assert cache.get(a) == b"x" * 10  # a is now the most recently used: b goes first
    cache.insert(d, b"y" * 10, pinned={c: 1})
    assert b not in cache and a in cache and c in cache and d in cache and stats.evictions == 1
    cache.insert(("s.tar", 99, 40), b"z" * 40, pinned={})  # larger than the cap: never cached
    cache.insert(("s.tar", 77, 10), b"w" * 10, pinned={a: 1, c: 1, d: 1})  # only pinned ones left: not cached
    assert set(cache.chunks) == {a, c, d} and stats.cache_bytes == stats.max_cache_bytes == 30


def test_retry_classification():
    from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError

    def client_error(code, status):
        return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                           "GetObject")

    def wrapped(e, outer):  # how s3fs hands them over: a Python error caused by the botocore one
        outer.__cause__ = e
        return outer

    assert is_retryable(wrapped(client_error("SlowDown", 503), OSError(16, "slow down")))
    assert is_retryable(wrapped(client_error("InternalError", 500), OSError(121, "internal")))
    assert is_retryable(wrapped(client_error("RequestTimeout", 400), TimeoutError("t")))
    assert is_retryable(client_error("ServiceUnavailable", 503)) and is_retryable(client_error("502", 502))
    assert not is_retryable(wrapped(client_error("NoSuchKey", 404), FileNotFoundError("x")))
    assert not is_retryable(wrapped(client_error("AccessDenied", 403), PermissionError("x")))
    assert not is_retryable(client_error("InvalidRange", 416))
    assert is_retryable(ConnectionClosedError(endpoint_url="u")) and is_retryable(ReadTimeoutError(endpoint_url="u"))
    assert is_retryable(ConnectionResetError()) and is_retryable(TimeoutError())
    assert not is_retryable(FileNotFoundError()) and not is_retryable(ValueError())
