"""`ingest run` end to end on a real local Ray cluster: real fixtures, synthetic corpus, kill/rerun, S3."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from ingest.config import IngestConfig
from ingest.markers import DONE_DIR
from ingest.run import run_ingest
from ingest.summary import FAILURES
from shards import manifest
from shards.format import decode_sample, iter_tar_samples
from shards.store import Store
from shards.verify import verify_store
from tests.support import REAL_FIXTURES, REPO

SMALL = IngestConfig(shard_bytes=256 << 10)


def samples_of(store: Store, **match):
    rows = [r for r in manifest.read_table(store, manifest.MANIFEST).to_pylist()
            if all(r[k] == v for k, v in match.items())]
    for r in rows:
        for key, group in iter_tar_samples(io.BytesIO(store.read_bytes(r["path"]))):
            yield decode_sample(key, group)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from ingest.synth import synthesize

    out = tmp_path_factory.mktemp("corpus")
    synthesize(out, sessions=4, seed=3)
    return out


@pytest.fixture(scope="module")
def ingested(corpus, tmp_path_factory, ray_cluster):
    out = tmp_path_factory.mktemp("store") / "store"
    summary = run_ingest(str(corpus), str(out), workers=2, config=SMALL, progress=False)
    return summary, Store(str(out))


def test_every_real_fixture_is_ingested_or_rejected_with_a_reason(tmp_path, ray_cluster):
    out = tmp_path / "store"
    summary = run_ingest(str(REAL_FIXTURES), str(out), workers=2, progress=False)
    store = Store(str(out))
    files = {p.name for p in REAL_FIXTURES.glob("*.nwb")}
    failed = {Path(f["file"]).name: f["reason"] for f in summary.failed}
    ok = {Path(f).name for f in summary.ok}
    assert ok | set(failed) == files
    # the four files with spikes produce samples; the NWB1 skeleton (1-element placeholders) is refused with a reason
    assert ok == files - {"496908818s.nwb"}
    assert failed["496908818s.nwb"]
    sessions = manifest.read_table(store, manifest.SESSIONS).to_pandas()
    assert set(sessions.session_id) == {Path(f).stem.replace(".", "-") for f in ok}
    assert set(sessions[sessions.session_id.str.startswith("sub-anm")].region) == {"ALM"}
    assert "unknown" in set(sessions.region)
    assert json.loads(store.read_bytes(FAILURES))[0]["file"].endswith("496908818s.nwb")
    assert summary.exit_code == 1
    assert verify_store(store)[1] == []


def test_round_trip_spikes_equal_the_nwb_exactly(ingested, corpus):
    summary, store = ingested
    assert summary.failed == [] and len(summary.ok) == 4
    units = manifest.read_table(store, manifest.UNITS).to_pandas()
    for nwb in sorted(corpus.glob("ephys_*.nwb")):
        with h5py.File(nwb, "r") as f:
            ids = f["units/id"][:]
            idx = f["units/spike_times_index"][:]
            st = f["units/spike_times"][:]
        per_unit = {str(u): np.sort(st[(idx[i - 1] if i else 0):idx[i]]) for i, u in enumerate(ids)}
        sid = nwb.stem
        got: dict[str, list] = {}
        for s in samples_of(store, session_id=sid):
            for u_idx, t in zip(s.arrays["spike_units"], s.arrays["spike_times"]):
                got.setdefault(s.meta["units"][u_idx], []).append(t)
        assert set(got) <= set(per_unit)
        for u, times in got.items():
            np.testing.assert_array_equal(np.sort(times), per_unit[u])
        assert set(units[units.session_id == sid].local_id) == set(per_unit) - {u for u, t in per_unit.items() if len(t) == 0}


def test_round_trip_dff_equals_the_nwb_exactly(ingested, corpus):
    _, store = ingested
    for nwb in sorted(corpus.glob("ophys_*.nwb")):
        with h5py.File(nwb, "r") as f:
            rrs = f["processing/ophys/DfOverF/DfOverF"]
            data, ts = rrs["data"][:], rrs["timestamps"][:]
            roi_ids = [str(i) for i in f["processing/ophys/ImageSegmentation/PlaneSegmentation/id"][:]]
        n = 0
        for s in samples_of(store, session_id=nwb.stem):
            idx = np.searchsorted(ts, s.arrays["frame_times"])
            np.testing.assert_array_equal(ts[idx], s.arrays["frame_times"])
            cols = [roi_ids.index(u) for u in s.meta["units"]]
            np.testing.assert_array_equal(s.arrays["dff"], data[np.ix_(idx, cols)])
            n += len(idx)
        assert n == len(ts)


def test_ephys_session_spanning_regions_yields_one_record_per_region(ingested):
    _, store = ingested
    sessions = manifest.read_table(store, manifest.SESSIONS).to_pandas()
    eph = sessions[sessions.modality == "ephys"]
    assert eph.groupby("session_id").region.nunique().min() >= 2
    oph = sessions[sessions.modality == "ophys"]
    assert (oph.groupby("session_id").region.nunique() == 1).all()
    shards = manifest.read_table(store, manifest.MANIFEST).to_pandas()
    for _, r in shards.iterrows():
        assert r.path.startswith(f"{r.modality}/{r.region}/{r.session_id}/{r.split}-")
    for s in samples_of(store, modality="ephys"):
        assert s.meta["region"] == s.meta["key"].split("__")[1]


def test_rerun_skips_done_files_and_rewrites_nothing(ingested, corpus):
    summary, store = ingested
    before = {p: os.stat(store.path(p)).st_mtime_ns for p in store.list("", ".tar")}
    tables_before = manifest.load(store)
    again = run_ingest(str(corpus), store.uri, workers=2, config=SMALL, progress=False)
    assert len(again.skipped) == 4 and again.ok == [] and again.failed == []
    assert {p: os.stat(store.path(p)).st_mtime_ns for p in store.list("", ".tar")} == before
    assert manifest.load(store).manifest.equals(tables_before.manifest)


@pytest.fixture()
def small_src(corpus, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in sorted(corpus.glob("*.nwb"))[:2]:
        shutil.copy2(p, src / p.name)
    return src


def test_rerun_trusts_size_and_mtime_and_rehash_reads_again(small_src, tmp_path, ray_cluster):
    out = str(tmp_path / "store")
    first = run_ingest(str(small_src), out, workers=2, config=SMALL, progress=False)
    assert len(first.ok) == 2
    victim = sorted(small_src.glob("*.nwb"))[0]
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)  # same size, and the mtime put back: a quick check cannot tell
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    quick = run_ingest(str(small_src), out, workers=2, config=SMALL, progress=False)
    assert len(quick.skipped) == 2 and quick.failed == []  # neither source was read
    full = run_ingest(str(small_src), out, workers=2, config=SMALL, progress=False, rehash=True)
    assert [Path(f["file"]).name for f in full.failed] == [victim.name] and len(full.skipped) == 1
    # the failed reread lost nothing: the session ingested from the good bytes is still whole
    sessions = manifest.read_table(Store(out), manifest.SESSIONS).to_pandas()
    assert victim.stem in set(sessions.session_id)
    assert verify_store(Store(out))[1] == []


def test_a_source_whose_bytes_changed_replaces_its_session(small_src, tmp_path, ray_cluster):
    from ingest.synth import synthesize

    out = str(tmp_path / "store")
    run_ingest(str(small_src), out, workers=2, config=SMALL, progress=False)
    other = tmp_path / "other"
    synthesize(other, sessions=2, seed=11)
    victim = sorted(small_src.glob("*.nwb"))[0]
    shutil.copy(other / victim.name, victim)  # same name, another recording
    again = run_ingest(str(small_src), out, workers=2, config=SMALL, progress=False)
    assert [Path(u).name for u in again.ok] == [victim.name] and len(again.skipped) == 1
    store = Store(out)
    sessions = manifest.read_table(store, manifest.SESSIONS).to_pandas()
    assert not sessions.duplicated(["session_id", "region"]).any()
    assert len(store.list(DONE_DIR, ".json")) == 2
    shards = manifest.read_table(store, manifest.MANIFEST).to_pandas()
    assert sorted(store.list("", ".tar")) == sorted(shards.path)  # old shards gone, none left over
    assert verify_store(store)[1] == []
    run_ingest(str(other / victim.name), str(tmp_path / "fresh"), workers=2, config=SMALL, progress=False)
    want = manifest.read_table(Store(str(tmp_path / "fresh")), manifest.SESSIONS).to_pandas()
    got = sessions[sessions.session_id == victim.stem]
    assert sorted(got.source_sha256) == sorted(want.source_sha256) and sorted(got.n_units) == sorted(want.n_units)


def test_corrupt_files_among_good_ones_fail_alone(small_src, tmp_path, ray_cluster):
    src = small_src
    data = sorted(src.glob("*.nwb"))[0].read_bytes()
    (src / "truncated.nwb").write_bytes(data[: len(data) // 2])
    (src / "notes.nwb").write_text("this is not HDF5\n")
    summary = run_ingest(str(src), str(tmp_path / "store"), workers=2, config=SMALL, progress=False)
    failed = {Path(f["file"]).name: f["reason"] for f in summary.failed}
    assert set(failed) == {"truncated.nwb", "notes.nwb"}
    assert all(reason and "\n" not in reason for reason in failed.values())
    assert len(summary.ok) == 2 and summary.exit_code == 1
    store = Store(str(tmp_path / "store"))
    assert {Path(f["file"]).name for f in json.loads(store.read_bytes(FAILURES))} == set(failed)
    assert verify_store(store)[1] == []


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kw)


def test_run_killed_part_way_then_rerun_gives_the_uninterrupted_manifest(corpus, tmp_path, ingested):
    _, reference = ingested
    out = tmp_path / "store"
    proc = _cli("ingest", "run", "--src", str(corpus), "--out", str(out), "--workers", "1", "--quiet",
                "--shard-mb", str(SMALL.shard_bytes / (1 << 20)))
    deadline = time.time() + 120
    done_dir, tmp_dir = out / DONE_DIR, out / ".tmp"
    while time.time() < deadline and proc.poll() is None:  # kill mid-shard or right after the first file
        if (tmp_dir.exists() and any(tmp_dir.iterdir())) or (done_dir.exists() and any(done_dir.iterdir())):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(str(out))
    # Ray workers notice their driver died within a moment; wait until nothing more lands
    n_done, stable_since = -1, time.time()
    while time.time() - stable_since < 2.0:
        now = len(store.list(DONE_DIR, ".json"))
        if now != n_done:
            n_done, stable_since = now, time.time()
        time.sleep(0.1)
    assert n_done < 4, "the run finished before it could be killed"
    # whatever is visible is whole: every .tar parses
    for rel in store.list("", ".tar"):
        list(iter_tar_samples(io.BytesIO(store.read_bytes(rel))))
    rerun = _cli("ingest", "run", "--src", str(corpus), "--out", str(out), "--workers", "2", "--quiet",
                 "--shard-mb", str(SMALL.shard_bytes / (1 << 20)))
    text, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, text
    assert f"{n_done} already done" in text
    for name in (manifest.MANIFEST, manifest.SESSIONS, manifest.UNITS, manifest.CHUNKS):
        a, b = manifest.read_table(store, name), manifest.read_table(reference, name)
        assert a.equals(b), name
    assert not (out / ".tmp").exists() or not any((out / ".tmp").iterdir())


def test_s3_output_is_verified_by_the_cli(corpus, s3_bucket, ray_cluster):
    uri = f"s3://{s3_bucket}/store"
    src = sorted(corpus.glob("*.nwb"))[:2]
    summary = run_ingest(str(src[0].parent), uri, workers=2, config=SMALL, progress=False)
    assert summary.failed == [] and summary.tables.manifest.num_rows > 0
    proc = _cli("shards", "verify", uri)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, text
    assert f"{summary.tables.manifest.num_rows} shards checked, 0 problems" in text
    # corrupt one object on the server: verify names it and exits 1
    import boto3

    bad = summary.tables.manifest.column("path")[0].as_py()
    boto3.client("s3").put_object(Bucket=s3_bucket, Key=f"store/{bad}", Body=b"garbage")
    proc = _cli("shards", "verify", uri)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and bad in text


def test_allen_nwb1_ophys_round_trips_through_ingest(tmp_path, ray_cluster):
    from ingest.synth import SynthConfig, synthesize

    synthesize(tmp_path / "nwb", sessions=2, seed=5, ophys_format="nwb1", config=SynthConfig(duration_s=120.0))
    summary = run_ingest(str(tmp_path / "nwb"), str(tmp_path / "store"), workers=2, config=SMALL, progress=False)
    assert summary.failed == [] and len(summary.ok) == 2
    store = Store(str(tmp_path / "store"))
    [nwb] = sorted((tmp_path / "nwb").glob("ophys_*.nwb"))
    with h5py.File(nwb, "r") as f:
        dff = f["processing/brain_observatory_pipeline/DfOverF/imaging_plane_1"]
        data, ts = dff["data"][:], dff["timestamps"][:]  # ROIs x frames in NWB 1
    sessions = manifest.read_table(store, manifest.SESSIONS).to_pandas()
    row = sessions[sessions.modality == "ophys"].iloc[0]
    n = 0
    for s in samples_of(store, session_id=row.session_id):
        idx = np.searchsorted(ts, s.arrays["frame_times"])
        np.testing.assert_array_equal(s.arrays["dff"], data[:, idx].T)
        n += len(idx)
    assert n == len(ts)


def test_sources_can_come_from_s3(corpus, s3_bucket, tmp_path, ray_cluster):
    import boto3

    client = boto3.client("s3")
    files = sorted(corpus.glob("*.nwb"))[:2]
    for p in files:
        client.upload_file(str(p), s3_bucket, f"nwb/{p.name}")
    summary = run_ingest(f"s3://{s3_bucket}/nwb", str(tmp_path / "store"), workers=2, config=SMALL, progress=False)
    assert summary.failed == [] and sorted(summary.ok) == [f"s3://{s3_bucket}/nwb/{p.name}" for p in files]
    sessions = manifest.read_table(Store(str(tmp_path / "store")), manifest.SESSIONS).to_pandas()
    assert set(sessions.session_id) == {p.stem for p in files}
