"""Paths read back from a store (done markers, manifest, chunk table) never reach outside it (issue 13.1)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ingest.config import IngestConfig
from ingest.discover import discover
from ingest.markers import DONE_DIR, previous_runs
from ingest.run import run_ingest
from ingest.task import ingest_file
from shards import manifest
from shards.store import Store, UnsafeKeyError, safe_key
from shards.verify import verify_store
from tests.support import REPO
from tests.support.storegen import ephys, make_store

SMALL = IngestConfig(shard_bytes=256 << 10)


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a//b", "./a", "a/.", "", "a\\..\\b", "~/x"])
def test_safe_key_refuses_keys_that_leave_the_store(key):
    with pytest.raises(UnsafeKeyError, match="marker.json: path"):
        safe_key(key, "marker.json", "STORE")
    assert safe_key("ephys/VISp/s1/train-00000.tar") == "ephys/VISp/s1/train-00000.tar"


@pytest.fixture()
def one_file_store(tmp_path, ray_cluster):
    from ingest.synth import SynthConfig, synthesize

    src = tmp_path / "src"
    synthesize(src, sessions=1, seed=2, config=SynthConfig(duration_s=60.0))
    out = tmp_path / "store"
    first = run_ingest(str(src), str(out), workers=1, config=SMALL, progress=False)
    assert first.failed == [] and len(first.ok) == 1
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    store = Store(str(out))
    [marker] = store.list(DONE_DIR, ".json")
    done = json.loads(store.read_bytes(marker))
    # from the store root, ../victim is tmp_path/victim
    done["shards"].append({**done["shards"][0], "path": "../victim/precious.txt"})
    store.write_bytes(marker, json.dumps(done).encode())
    [nwb] = sorted(src.glob("*.nwb"))
    with open(nwb, "ab") as fh:  # the source changed: a rerun retires the old session
        fh.write(b"\0")
    return src, out, store, marker, victim / "precious.txt"


def test_tampered_marker_is_refused_and_nothing_outside_is_deleted(one_file_store):
    src, out, store, marker, precious = one_file_store
    shards_before = store.list("", ".tar")
    with pytest.raises(UnsafeKeyError) as err:
        run_ingest(str(src), str(out), workers=1, config=SMALL, progress=False)
    assert store.url(marker) in str(err.value) and "../victim/precious.txt" in str(err.value)
    assert "\n" not in str(err.value)
    assert precious.read_text() == "keep me"
    assert store.list("", ".tar") == shards_before  # nothing inside was deleted either

    # the worker refuses on its own too (a driver that did not check): the file fails, naming the marker
    [source] = discover(str(src))
    previous = {"source_sha256": os.path.basename(marker)[:-5], "fingerprint": None}
    res = ingest_file(source, str(out), SMALL, previous)
    assert res["status"] == "failed" and store.url(marker) in res["reason"]
    assert precious.read_text() == "keep me" and store.list("", ".tar") == shards_before

    # the CLI: one line, exit 2
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "ingest", "run", "--src", str(src), "--out", str(out), "--quiet",
                           "--workers", "1", "--shard-mb", "0.25"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "../victim/precious.txt" in proc.stderr
    assert precious.read_text() == "keep me"


def _rewrite_manifest(store: Store, extra: list[dict]) -> None:
    rows = manifest.read_table(store, manifest.MANIFEST).to_pylist() + extra
    table = pa.Table.from_pylist(rows, schema=manifest.MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(manifest.MANIFEST, buf.getvalue())


def test_verify_and_readers_refuse_a_manifest_path_outside_the_store(tmp_path):
    store = make_store(str(tmp_path / "store"), [ephys("e1", "VISp", 60.0)])
    row = manifest.read_table(store, manifest.MANIFEST).to_pylist()[0]
    # a perfect copy of a real shard outside the store: today verify follows the path and finds it fine
    (tmp_path / "outside.tar").write_bytes(store.read_bytes(row["path"]))
    _rewrite_manifest(store, [{**row, "path": "../outside.tar"}])
    n, problems = verify_store(store)
    assert [p.path for p in problems] == ["../outside.tar"] and "refused" in problems[0].reason
    with pytest.raises(UnsafeKeyError, match="manifest.parquet: path '../outside.tar'"):
        manifest.load(store)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "shards", "verify", store.uri], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "../outside.tar" in proc.stdout and "1 problems" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "shards", "ls", store.uri], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "manifest.parquet" in proc.stderr


def test_s3_keys_outside_the_prefix_are_refused(s3_bucket):
    import boto3

    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="x", Body=b"outside the store")
    client.put_object(Bucket=s3_bucket, Key="abs.tar", Body=b"outside the store")
    store = make_store(f"s3://{s3_bucket}/store", [ephys("e1", "VISp", 60.0)])
    row = manifest.read_table(store, manifest.MANIFEST).to_pylist()[0]
    _rewrite_manifest(store, [{**row, "path": "../x"}, {**row, "path": "/abs.tar"}])
    _, problems = verify_store(store)
    assert sorted(p.path for p in problems) == ["../x", "/abs.tar"]
    with pytest.raises(UnsafeKeyError, match="manifest.parquet: path"):
        manifest.read_table(store, manifest.MANIFEST)
    for key in ("../x", "/abs.tar"):
        with pytest.raises(UnsafeKeyError):
            store.remove(key, "a marker")
        with pytest.raises(UnsafeKeyError):
            store.read_bytes(key)
    assert client.get_object(Bucket=s3_bucket, Key="x")["Body"].read() == b"outside the store"
    assert client.get_object(Bucket=s3_bucket, Key="abs.tar")["Body"].read() == b"outside the store"
    # a marker on S3 with such a key is refused when read back
    marker = f"{DONE_DIR}/{'0' * 64}.json"
    store.write_bytes(marker, json.dumps({"source": "s3://b/a.nwb", "source_sha256": "0" * 64,
                                          "shards": [{"path": "../x"}]}).encode())
    with pytest.raises(UnsafeKeyError, match=marker):
        previous_runs(store)


# ---- store errors are one line naming the store and what to do (issue 13.8) ---------------------------

def _cli_err(*args, env=None, timeout=300):
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    full.pop("RAY_ADDRESS", None)
    for k in [k for k, v in full.items() if v is None]:
        full.pop(k)
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode not in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture()
def moto_auth():
    """The moto server checks credentials while this fixture is active (it accepts any by default)."""
    import moto.settings

    old = moto.settings.INITIAL_NO_AUTH_ACTION_COUNT
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    yield
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = old


def test_wrong_and_missing_s3_credentials_are_one_line(s3_bucket, moto_auth):
    uri = f"s3://{s3_bucket}/store"
    line = _cli_err("shards", "ls", uri, env={"AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert uri in line and "access denied" in line and "AWS_ACCESS_KEY_ID" in line
    nocreds = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
               "AWS_PROFILE": None, "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent",
               "AWS_EC2_METADATA_DISABLED": "true"}
    line = _cli_err("shards", "verify", uri, env=nocreds)
    assert uri in line and "no AWS credentials" in line
    line = _cli_err("ingest", "run", "--src", str(REPO / "tests" / "fixtures" / "real"), "--out", uri, "--quiet",
                    env={"AWS_ACCESS_KEY_ID": "wrong"})
    assert uri in line and "access denied" in line


def test_no_such_bucket_and_a_garbage_manifest_are_one_line(s3_bucket, tmp_path):
    uri = f"s3://{s3_bucket}-absent/store"
    for cmd in (("shards", "ls", uri), ("shards", "verify", uri),
                ("ingest", "run", "--src", str(REPO / "tests" / "fixtures" / "real"), "--out", uri, "--quiet"),
                ("ingest", "run", "--src", uri, "--out", str(tmp_path / "out"), "--quiet")):
        line = _cli_err(*cmd)
        assert "no such bucket" in line and f"{s3_bucket}-absent" in line, cmd
    store = make_store(f"s3://{s3_bucket}/store", [ephys("e1", "VISp", 30.0)])
    store.write_bytes(manifest.MANIFEST, b"garbage")
    line = _cli_err("shards", "ls", store.uri)
    assert store.url(manifest.MANIFEST) in line and "not a readable Parquet table" in line and "<Buffer>" not in line
    with pytest.raises(ValueError, match="manifest.parquet: not a readable Parquet"):
        from shards.stream.dataset import MixtureStream, StreamConfig

        MixtureStream(StreamConfig(store=store.uri, mix="ephys=1", batch_size=2))


# ---- nothing named *.nwb is skipped silently (issue 13.10) ----------------------------------------------

def test_a_directory_and_a_broken_symlink_named_nwb_are_failures(tmp_path, ray_cluster):
    import shutil

    from ingest.summary import FAILURES, format_summary
    from tests.support import REAL_FIXTURES

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REAL_FIXTURES / "ecephys_tutorial_v2.5.0.nwb", src / "good.nwb")
    (src / "folder.nwb").mkdir()
    (src / "dangling.nwb").symlink_to(tmp_path / "gone.nwb")
    out = tmp_path / "store"
    summary = run_ingest(str(src), str(out), workers=1, progress=False)
    assert len(summary.ok) == 1 and summary.exit_code == 1
    failed = {os.path.basename(f["file"]): f["reason"] for f in summary.failed}
    assert set(failed) == {"folder.nwb", "dangling.nwb"}
    assert "directory" in failed["folder.nwb"] and "broken symlink" in failed["dangling.nwb"]
    written = {os.path.basename(f["file"]): f["reason"] for f in json.loads(Store(str(out)).read_bytes(FAILURES))}
    assert written == failed
    text = format_summary(summary, str(out))
    assert "2 failed" in text and "FAILED" in text and "folder.nwb" in text and "dangling.nwb" in text
