"""Shard writing, stock-webdataset compatibility, atomic store writes, verify — local and on S3."""

import io
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds

from ingest.chunks import chunk_samples
from ingest.records import ArrayTrace, Intervals, SessionRecord
from ingest.splits import assign_splits
from shards import manifest
from shards.format import decode_sample, iter_tar_samples
from shards.store import Store
from shards.verify import verify_store
from shards.writer import RecordShardWriter


def ephys_record(seed=0, n_units=5, dur=120.0):
    rng = np.random.default_rng(seed)
    times = np.sort(rng.uniform(0, dur, 4000))
    units = rng.integers(0, n_units, len(times)).astype(np.int32)
    start = np.arange(0, dur, 0.25)
    stim = [Intervals("static_gratings", start, start + 0.25, np.arange(len(start)) % 6)]
    return SessionRecord("sess-a", "ephys", "VISp", "m1", "x.nwb", [str(i) for i in range(n_units)],
                         0.0, dur, stim, spike_times=times, spike_units=units)


def ophys_record(seed=0, n_units=4, dur=60.0, nan_rows=(), nan_cells=()):
    rng = np.random.default_rng(seed)
    ft = np.arange(0, dur, 1 / 30.0)
    dff = rng.normal(size=(len(ft), n_units)).astype(np.float32)
    for r in nan_rows:
        dff[r] = np.nan
    for r, c in nan_cells:
        dff[r, c] = np.nan
    return SessionRecord("sess-b", "ophys", "VISl", "m2", "y.nwb", [str(i) for i in range(n_units)],
                         0.0, dur, [], trace=ArrayTrace(ft, dff)), dff, ft


def write_record(store, rec, target_bytes=64 << 20):
    w = RecordShardWriter(store, rec.modality, rec.region, rec.session_id, target_bytes)
    for split, sample in chunk_samples(rec, assign_splits(rec.session_id, rec.region, rec.t_start, rec.t_end, rec.stimuli)):
        w.add(split, sample)
    w.close()
    return w


def test_stock_webdataset_reads_every_shard_and_arrays_round_trip(tmp_path):
    store = Store(str(tmp_path / "store"))
    rec = ephys_record()
    w = write_record(store, rec, target_bytes=20_000)
    assert len(w.shard_rows) > 3  # small target -> several shards per split
    seen = []
    urls = [store.url(r["path"]) for r in w.shard_rows]
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        meta = s["json"]
        assert meta["session_id"] == "sess-a" and meta["modality"] == "ephys"
        t = s["spike_times.npy"]
        lo, hi = np.searchsorted(rec.spike_times, [meta["t_start"], meta["t_end"]])
        np.testing.assert_array_equal(t, rec.spike_times[lo:hi])
        np.testing.assert_array_equal(s["spike_units.npy"], rec.spike_units[lo:hi])
        seen.append((meta["t_start"], meta["t_end"]))
    assert abs(sum(b - a for a, b in seen) - 120.0) < 1e-6  # chunks tile the session exactly once


def test_chunk_byte_ranges_hold_exactly_one_sample(tmp_path):
    store = Store(str(tmp_path / "s"))
    w = write_record(store, ephys_record())
    for row in w.chunk_rows:
        blob = store.read_range(row["path"], row["offset"], row["offset"] + row["length"])
        [(key, group)] = list(iter_tar_samples(io.BytesIO(blob)))
        assert key == row["key"]
        assert decode_sample(key, group).meta["t_start"] == row["t_start"]


def test_nan_dff_is_dropped_never_written(tmp_path):
    rec, dff, ft = ophys_record(nan_rows=range(30, 90), nan_cells=[(200, 2)])
    store = Store(str(tmp_path / "s"))
    w = write_record(store, rec)
    n_frames = 0
    for row in w.shard_rows:
        for key, group in iter_tar_samples(io.BytesIO(store.read_bytes(row["path"]))):
            s = decode_sample(key, group)
            assert not np.isnan(s.arrays["dff"]).any()
            cols = [int(u) for u in s.meta["units"]]
            idx = np.searchsorted(ft, s.arrays["frame_times"])
            np.testing.assert_array_equal(s.arrays["dff"], dff[np.ix_(idx, cols)])
            if s.meta["t_start"] <= ft[200] < s.meta["t_end"]:
                assert "2" not in s.meta["units"]
            n_frames += len(idx)
    assert n_frames == len(ft) - 60


def test_shards_are_byte_identical_across_runs(tmp_path):
    a = write_record(Store(str(tmp_path / "a")), ephys_record())
    b = write_record(Store(str(tmp_path / "b")), ephys_record())
    assert [r["sha256"] for r in a.shard_rows] == [r["sha256"] for r in b.shard_rows]


def test_atomic_write_leaves_nothing_visible_when_interrupted(tmp_path):
    store = Store(str(tmp_path / "s"))
    w = RecordShardWriter(store, "ephys", "VISp", "sess-a")
    rec = ephys_record()
    for split, sample in chunk_samples(rec, {"train": [(0.0, 60.0)]}):
        w.add(split, sample)
    # the process "dies" here: nothing published yet, the temp file is under .tmp/
    assert store.list("", ".tar") == []
    assert os.listdir(tmp_path / "s" / ".tmp")
    store.clean_tmp()
    assert not (tmp_path / "s" / ".tmp").exists()


def _tables(store, w):
    manifest.write_table(store, manifest.MANIFEST, w.shard_rows)


def test_verify_names_the_corrupt_and_the_missing_shard(tmp_path):
    store = Store(str(tmp_path / "s"))
    w = write_record(store, ephys_record(), target_bytes=20_000)
    _tables(store, w)
    n, problems = verify_store(store)
    assert n == len(w.shard_rows) and problems == []
    bad, gone = w.shard_rows[1]["path"], w.shard_rows[2]["path"]
    p = store.path(bad)
    data = bytearray(open(p, "rb").read())
    data[700] ^= 0xFF
    open(p, "wb").write(bytes(data))
    os.remove(store.path(gone))
    _, problems = verify_store(store)
    assert {pr.path for pr in problems} == {bad, gone}
    assert any("sha256" in pr.reason for pr in problems) and any("missing" in pr.reason for pr in problems)


def test_s3_store_round_trip_on_a_real_s3_server(s3_bucket):
    store = Store(f"s3://{s3_bucket}/prefix")
    w = write_record(store, ephys_record(), target_bytes=20_000)
    _tables(store, w)
    assert store.list("", ".tar") == sorted(r["path"] for r in w.shard_rows)
    n, problems = verify_store(store)
    assert n == len(w.shard_rows) and problems == []
    t = manifest.read_table(store, manifest.MANIFEST)
    assert t.num_rows == len(w.shard_rows) and set(t.column_names) >= {"path", "sha256", "n_samples", "t_start"}


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.parquet: missing"):
        manifest.read_table(Store(str(tmp_path)), manifest.MANIFEST)


def test_lean_reader_decodes_exactly_what_tarfile_decodes(tmp_path):
    from shards.fastread import iter_samples

    store = Store(str(tmp_path / "s"))
    w = write_record(store, ophys_record()[0])
    for row in w.shard_rows:
        data = store.read_bytes(row["path"])
        ref = [decode_sample(k, g) for k, g in iter_tar_samples(io.BytesIO(data))]
        got = list(iter_samples(data))
        assert [s.key for s in got] == [s.key for s in ref]
        for a, b in zip(got, ref):
            assert a.meta == b.meta and a.arrays.keys() == b.arrays.keys()
            for k in a.arrays:
                assert a.arrays[k].dtype == b.arrays[k].dtype
                np.testing.assert_array_equal(a.arrays[k], b.arrays[k])


def test_lean_reader_rejects_a_damaged_header_and_a_pickled_array(tmp_path):
    from shards.fastread import CorruptShard, iter_samples, npy_view

    store = Store(str(tmp_path / "s"))
    w = write_record(store, ephys_record())
    data = bytearray(store.read_bytes(w.shard_rows[0]["path"]))
    data[130] ^= 0x01  # inside the first header's size field
    with pytest.raises(CorruptShard, match="checksum"):
        list(iter_samples(bytes(data)))
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptShard, match="object arrays"):
        npy_view(memoryview(buf.getvalue()))


def test_lean_reader_parses_every_npy_header_numpy_writes():
    """The regex fast path (plain dtypes) and the literal_eval fallback (structured dtypes, Fortran
    order, 0-d, empty) give exactly what np.load gives; a garbled header is a CorruptShard."""
    from shards.fastread import CorruptShard, npy_view

    arrays = [np.arange(5.0), np.zeros((3, 4), np.float32), np.zeros((0,), np.int32), np.float64(3.5),
              np.asfortranarray(np.arange(6).reshape(2, 3)), np.zeros((2, 0, 3)), np.array([True, False]),
              np.zeros(3, dtype=[("t", "<f8"), ("u", "<i4")]), np.array(["ab", "c"])]
    for a in arrays:
        buf = io.BytesIO()
        np.save(buf, a, allow_pickle=False)
        got, want = npy_view(memoryview(buf.getvalue())), np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)
        assert got.dtype == want.dtype and got.shape == want.shape and got.flags.f_contiguous == want.flags.f_contiguous
        np.testing.assert_array_equal(got, want)
    raw = bytearray(buf.getvalue())
    raw[12:20] = b"{'desc!!"
    with pytest.raises(CorruptShard, match="header"):
        npy_view(memoryview(bytes(raw)))


def test_tar_writer_bytes_equal_what_tarfile_writes(tmp_path):
    from shards.format import TarSampleWriter, members

    rec = ephys_record()
    samples = [s for _, s in chunk_samples(rec, {"train": [(0.0, 40.0)]})]
    ours, ref = io.BytesIO(), io.BytesIO()
    w = TarSampleWriter(ours)
    for s in samples:
        w.write(s)
    w.close()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            for name, data in members(s):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    assert ours.getvalue() == ref.getvalue()
