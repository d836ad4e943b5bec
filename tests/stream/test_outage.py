"""An S3 outage is a network failure, not data corruption (issue 13.4): once the fetcher's retry policy
is spent, the stream stops with one line naming the endpoint and the object, and skips nothing.

Each test runs its own moto server on a free port (not the session's), and stops it mid-stream: a
ThreadedMotoServer, or, where DataLoader workers fork, a moto server in its own process that the test
kills (a forked worker inherits a threaded server's listening socket, which then accepts connections
that nobody answers: a black hole, not a dead server)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from shards.store import Store, StoreError
from shards.stream.dataset import MixtureStream, StreamConfig
from shards.stream.fetch import ChunkFetcher, FetchError, StoreUnavailable
from shards.stream.loader import StreamLoader
from tests.support.faulty_proxy import FaultyProxy
from tests.support.storegen import make_store, uneven_records

RETRIES = 8  # ChunkFetcher's default policy, which the stream and `shards mix` use


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("outage") / "store"), uneven_records())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(kind: str, port: int):
    """(stop function) of a moto server on 127.0.0.1:port, in this process or its own."""
    if kind == "thread":
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        return server.stop
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.1)

    def kill():
        proc.kill()
        proc.wait()
    return kill


@pytest.fixture
def own_s3(local_store, monkeypatch, request):
    """(stop, endpoint, store uri): a moto server of this test alone (``request.param``: "thread", the
    default, or "process"), holding a copy of the store."""
    port = _free_port()
    server_stop = _start_server(getattr(request, "param", "thread"), port)
    endpoint = f"http://127.0.0.1:{port}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="outage")
    root = Path(local_store.root)
    for p in root.rglob("*"):
        if p.is_file() and ".tmp" not in p.parts:
            client.upload_file(str(p), "outage", f"store/{p.relative_to(root)}")
    state = {"stopped": False}

    def stop():
        if not state["stopped"]:
            state["stopped"] = True
            server_stop()

    yield stop, endpoint, "s3://outage/store"
    stop()


def _stop_after(monkeypatch, n_batches: int, stop) -> dict:
    """Stop the server when the stream starts building batch number ``n_batches`` (in this process)."""
    orig = MixtureStream.make_batch
    seen = {"batches": 0}

    def make_batch(self, *a, **kw):
        seen["batches"] += 1
        if seen["batches"] == n_batches:
            stop()
        return orig(self, *a, **kw)

    monkeypatch.setattr(MixtureStream, "make_batch", make_batch)
    return seen


MESSAGE = re.compile(r"S3 endpoint (http://127\.0\.0\.1:\d+) unreachable after (\d+) attempts over ([\d.]+) s "
                     r"reading (s3://outage/store/\S+\.tar) bytes \d+-\d+; last error: \w+")


def test_shards_mix_ends_with_one_line_naming_the_endpoint_and_object_when_s3_dies(own_s3, monkeypatch, capsys):
    from shards.__main__ import main

    stop, endpoint, uri = own_s3
    seen = _stop_after(monkeypatch, 3, stop)
    rc = main(["mix", uri, "--mix", "ephys=1,ophys=1", "--batches", "12", "--batch-size", "8"])
    out, err = capsys.readouterr()
    assert rc == 2 and seen["batches"] < 12
    lines = err.strip().splitlines()
    assert len(lines) == 1, err  # no "skipping corrupt sample" lines, no traceback
    m = MESSAGE.search(lines[0])
    assert m, lines[0]
    assert m.group(1) == endpoint and int(m.group(2)) == RETRIES
    assert "corrupt" not in err.lower() and out == ""


@pytest.mark.parametrize("workers,own_s3", [(0, "thread"), (2, "process")], indirect=["own_s3"])
def test_training_stream_stops_on_an_outage_and_counts_no_corrupt_sample(own_s3, workers):
    stop, endpoint, uri = own_s3
    cfg = StreamConfig(store=uri, mix="ephys=0.4,ophys=0.6", batch_size=6, epoch_windows=240, fetch_threads=4,
                       batches_per_transfer=2)
    loader = StreamLoader(MixtureStream(cfg), num_workers=workers, prestart=False)
    got = 0
    with pytest.raises(StoreUnavailable) as info:
        for batch in loader:
            assert int(batch["n_skipped"]) == 0
            got += 1
            if got == 2:
                stop()  # the workers (if any) have forked: they lose the server too
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg, msg  # a worker's error comes back as its own one line
    m = MESSAGE.search(msg)
    assert m and m.group(1) == endpoint and int(m.group(2)) == RETRIES, msg
    assert loader.state.skipped == 0 and got < 40


def test_a_prefetched_chunk_that_failed_keeps_its_outage_error(own_s3, local_store):
    stop, endpoint, uri = own_s3
    rows = MixtureStream(StreamConfig(store=local_store.uri, mix="ephys=1")).chunks.head(4)
    items = list(zip(rows.path, rows.offset, rows.length))
    stop()
    with ChunkFetcher(Store(uri), threads=2, retries=3, backoff_s=0.01) as f:
        f.prefetch(items)
        for it in items:  # each fetched by a background thread, given up, and raised to the reader as is
            with pytest.raises(StoreUnavailable) as info:
                f.get(*it)
            e = info.value
            assert e.endpoint == endpoint and e.attempts == 3 and e.url == f"{uri}/{it[0]}"
            assert isinstance(e, FetchError) and "EndpointConnectionError" in e.last


def test_no_attempt_starts_after_give_up_s(local_store, s3_server, s3_bucket, monkeypatch):
    remote = Store(f"s3://{s3_bucket}/p")
    rows = MixtureStream(StreamConfig(store=local_store.uri, mix="ephys=1")).chunks.head(1)
    remote.write_bytes(rows.path.iloc[0], local_store.read_bytes(rows.path.iloc[0]))
    with FaultyProxy(s3_server, every_drop=1) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        with ChunkFetcher(Store(remote.uri), retries=8, backoff_s=0.2, max_backoff_s=0.2, give_up_s=0.0) as f:
            with pytest.raises(StoreUnavailable, match=r"unreachable after 1 attempt over") as info:
                f.get(rows.path.iloc[0], int(rows.offset.iloc[0]), int(rows.length.iloc[0]))
    assert info.value.attempts == 1 and info.value.endpoint == proxy.url


def test_the_training_cli_finds_the_stream_error_inside_what_ray_wraps_it_in():
    from shards.stream.fetch import StoreUnavailable
    from trainer.train import data_error

    outage = StoreUnavailable("S3 endpoint http://127.0.0.1:1 unreachable after 8 attempts over 2.2 s reading s3://b/x.tar")

    class TrainingFailed(RuntimeError):  # the shape of Ray Train's failure: per-worker errors in a dict
        def __init__(self, failures):
            super().__init__("Training failed")
            self.worker_failures = failures

    try:
        try:
            raise outage
        except StoreUnavailable as exc:
            raise RuntimeError("worker 1 died") from exc
    except RuntimeError as worker_error:
        wrapped = TrainingFailed({1: worker_error})
    assert data_error(wrapped) is outage
    assert data_error(TrainingFailed({0: ValueError("a bug")})) is None
    # Ray Train restarts a worker that failed (max_failures); on a dead endpoint the restarted one fails
    # opening the store: Ray's own WorkerGroupError holding a StoreError, still its one line
    from ray.train import WorkerGroupError

    unreachable = StoreError("s3://b/store: cannot reach the S3 endpoint http://127.0.0.1:1 (...); check "
                             "AWS_ENDPOINT_URL and the network")
    try:
        raise unreachable
    except StoreError as exc:
        restarted = WorkerGroupError("[Rank 0 Error Snippet]: ...", {0: exc})
    assert data_error(restarted) is unreachable
