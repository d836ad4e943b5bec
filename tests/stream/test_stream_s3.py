"""The stream from a real S3-compatible server (moto on 127.0.0.1), also through a faulty proxy."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest
import torch

from shards.stream.dataset import MixtureStream, StreamConfig
from shards.stream.loader import StreamLoader
from tests.support.faulty_proxy import FaultyProxy
from tests.support.storegen import make_store, uneven_records


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("s3src") / "store"), uneven_records())


def upload(store, bucket: str, prefix: str = "store") -> str:
    client = boto3.client("s3")
    root = Path(store.root)
    for p in root.rglob("*"):
        if p.is_file() and ".tmp" not in p.parts:
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(root)}")
    return f"s3://{bucket}/{prefix}"


def batches(uri: str, workers: int = 0, **kw) -> list[dict]:
    cfg = StreamConfig(store=uri, mix="ephys=0.4,ophys=0.6", batch_size=6, epoch_windows=120, fetch_threads=4, **kw)
    return [{k: v.clone() for k, v in b.items()} for b in StreamLoader(MixtureStream(cfg), num_workers=workers)]


def assert_same(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for k in x:
            assert torch.equal(x[k], y[k]), k


def test_streaming_from_s3_equals_streaming_from_local_window_for_window(local_store, s3_bucket):
    uri = upload(local_store, s3_bucket)
    assert_same(batches(uri, workers=2), batches(local_store.uri, workers=2))


def test_stream_survives_503_drops_and_delays_with_identical_output(local_store, s3_bucket, s3_server, monkeypatch):
    uri = upload(local_store, s3_bucket)
    reference = batches(local_store.uri)
    with FaultyProxy(target=s3_server, every_503=4, every_drop=7, delay_every=5, delay_s=0.2, every_truncate=11) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        got = batches(uri, check_shards=False)
        counts = proxy.counts
    assert_same(got, reference)
    assert counts["slowdown"] > 0 and counts["dropped"] > 0 and counts["truncated"] > 0


def test_mix_report_is_the_same_for_a_local_and_an_s3_copy(local_store, s3_bucket):
    from shards.stream.report import mix_report

    uri = upload(local_store, s3_bucket)
    kw = dict(mix="ephys/VISp=1,ephys=1,ophys=2", batch_size=4)
    a = mix_report(StreamConfig(store=local_store.uri, **kw), batches=10, world_size=2)
    b = mix_report(StreamConfig(store=uri, **kw), batches=10, world_size=2)
    assert a == b
    assert a["batches_per_rank"] == [10, 10]
    assert {k: v["windows"] for k, v in a["selectors"].items()} == {"ephys/VISp": 20, "ephys": 20, "ophys": 40}
