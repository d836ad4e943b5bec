"""The stream checks every sample's bytes (issue 13.6): an xxh3 per sample in chunks.parquet, written at
ingest, checked before decoding; a mismatch is a corrupt sample (skipped and counted, or raised in
strict mode naming the shard), `shards verify --deep` decodes every sample as the stream does, and
`shards mix` reports how many samples it skipped (issue 13.10)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from shards import manifest
from shards.__main__ import main
from shards.fastread import BLOCK
from shards.stream.dataset import CorruptSampleError, MixtureStream, StreamConfig
from shards.stream.integrity import COLUMN, checksum
from shards.stream.loader import StreamLoader
from shards.stream.report import mix_report
from tests.support.storegen import make_store, uneven_records


def cfg(store, **kw):
    base = dict(store=store.uri, mix="ephys=1", batch_size=8, seed=0, fetch_threads=2, epoch_windows=200)
    base.update(kw)
    return StreamConfig(**base)


@pytest.fixture
def store(tmp_path):
    return make_store(str(tmp_path / "s"), uneven_records()[:2])


def _members(blob: bytes) -> dict[str, tuple[int, int]]:
    """name -> (start, end) of each member's data inside a sample's bytes."""
    out, pos = {}, 0
    while pos + BLOCK <= len(blob) and any(blob[pos:pos + BLOCK]):
        name = blob[pos:pos + 100].split(b"\0", 1)[0].decode()
        size = int(blob[pos + 124:pos + 136].split(b"\0", 1)[0].strip() or b"0", 8)
        out[name] = (pos + BLOCK, pos + BLOCK + size)
        pos += BLOCK + -(-size // BLOCK) * BLOCK
    return out


def flip_spike_times(store, nth: int = 3, row: int | None = None):
    """Change 8 bytes of one train sample's spike_times data (still a valid .npy and tar: only the checksum
    can tell), leaving manifest.parquet's sha256 stale: the nth EPhys train sample, or chunk ``row``.
    Returns that sample's chunk row."""
    chunks = manifest.read_table(store, manifest.CHUNKS).to_pandas()
    r = chunks.iloc[row] if row is not None else chunks[(chunks.split == "train") & (chunks.modality == "ephys")].iloc[nth]
    p = store.path(r.path)
    data = bytearray(open(p, "rb").read())
    blob = bytes(data[r.offset:r.offset + r.length])
    start, end = _members(blob)[f"{r.key}.spike_times.npy"]
    at = r.offset + end - 16  # the second-to-last spike time: a float64, whatever its bits
    data[at:at + 8] = bytes(b ^ 0x5A for b in data[at:at + 8])
    open(p, "wb").write(bytes(data))
    return r


def test_ingest_writes_the_xxh3_of_each_samples_bytes(store):
    chunks = manifest.read_table(store, manifest.CHUNKS)
    assert COLUMN in chunks.column_names and chunks.column(COLUMN).null_count == 0
    for r in chunks.to_pylist()[:20]:
        assert r[COLUMN] == checksum(store.read_range(r["path"], r["offset"], r["offset"] + r["length"]))
        assert len(r[COLUMN]) == 16


def test_flipped_bytes_that_still_decode_are_caught_by_the_stream(store):
    r = flip_spike_times(store)
    lenient = StreamLoader(MixtureStream(cfg(store, error_budget=0.5)), num_workers=0)
    skipped = sum(int(b["n_skipped"]) for b in lenient)
    windows_of_r = int((MixtureStream(cfg(store)).plan().chunk == r.name).sum())
    assert skipped == windows_of_r > 0  # every window of the bad sample, nothing else
    with pytest.raises(CorruptSampleError, match=rf"corrupt sample {r.key} in \S*{r.path}: .*xxh3 .* differs"):
        list(StreamLoader(MixtureStream(cfg(store, strict=True)), num_workers=0))
    # the check can be turned off (bench/stream.py measures its cost): then the bytes decode, wrongly
    assert sum(int(b["n_skipped"]) for b in StreamLoader(MixtureStream(cfg(store, check_checksums=False)),
                                                          num_workers=0)) == 0


def test_the_budget_is_checked_at_every_skipped_sample_not_per_batch(store):
    r = flip_spike_times(store)
    s = MixtureStream(cfg(store, error_budget=0.0))
    plan = s.plan()
    i = int(np.flatnonzero(plan.chunk == r.name)[0])
    pos = np.arange(i, i + 8)  # a batch holding the bad sample
    with pytest.raises(CorruptSampleError, match="over the error budget of 0"):
        s.make_batch(plan, pos, 0, {})


def test_a_truncated_local_shard_is_a_corrupt_sample(store):
    chunks = manifest.read_table(store, manifest.CHUNKS).to_pandas()
    train = chunks[(chunks.split == "train") & (chunks.modality == "ephys")]
    last = train.sort_values("offset").groupby("path").tail(1).iloc[0]
    with open(store.path(last.path), "r+b") as f:
        f.truncate(last.offset + last.length // 2)
    with pytest.raises(CorruptSampleError, match=rf"{last.key}.*ends after"):
        list(StreamLoader(MixtureStream(cfg(store, strict=True)), num_workers=0))
    lenient = StreamLoader(MixtureStream(cfg(store, error_budget=0.5)), num_workers=0)
    assert sum(int(b["n_skipped"]) for b in lenient) > 0


def test_mix_reports_skipped_samples_in_text_and_json(store, capsys):
    args = ["mix", store.uri, "--mix", "ephys=1", "--batches", "20", "--batch-size", "8", "--error-budget", "0.5"]
    assert main(args + ["--json"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["skipped_samples"] == 0 and clean["skipped_samples_per_rank"] == [0]
    r = flip_spike_times(store)
    n_bad = int((MixtureStream(cfg(store, epoch_windows=160)).plan().chunk == r.name).sum())
    assert n_bad > 0
    assert main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["skipped_samples"] == n_bad
    assert main(args) == 0
    assert f"corrupt samples skipped: {n_bad}" in capsys.readouterr().out
    assert main(args[:-2]) == 2  # over the default budget of 1%: one line, naming the budget
    assert "over the error budget of 2" in capsys.readouterr().err
    assert main(args + ["--strict"]) == 2
    assert f"corrupt sample {r.key} in {store.url(r.path)}" in capsys.readouterr().err
    rep2 = mix_report(cfg(store, error_budget=0.5), batches=10, world_size=2)
    assert rep2["skipped_samples"] == sum(rep2["skipped_samples_per_rank"]) > 0


def test_shards_verify_names_the_shard_and_deep_names_the_sample(store, capsys):
    assert main(["verify", "--deep", store.uri]) == 0
    assert "0 problems" in capsys.readouterr().out
    r = flip_spike_times(store)
    assert main(["verify", store.uri]) == 1
    out = capsys.readouterr().out
    assert f"BAD {store.url(r.path)}: sha256" in out and r.key not in out
    assert main(["verify", "--deep", store.uri]) == 1
    out = capsys.readouterr().out
    bad = [ln for ln in out.splitlines() if ln.startswith("BAD")]
    assert any(r.key in ln and "ChecksumMismatch" in ln and r.path in ln for ln in bad), out
    assert len([ln for ln in bad if "sample" in ln]) == 1  # only that sample


def test_verify_deep_decodes_what_the_checksum_cannot_vouch_for(store, capsys):
    """A sample whose bytes and checksum were both rewritten (or written wrong at ingest) still fails --deep
    when it does not decode the way the stream decodes."""
    chunks = manifest.read_table(store, manifest.CHUNKS).to_pandas()
    r = chunks.iloc[5]
    p = store.path(r.path)
    data = bytearray(open(p, "rb").read())
    blob = bytes(data[r.offset:r.offset + r.length])
    start, _ = _members(blob)[f"{r.key}.json"]
    data[r.offset + start:r.offset + start + 1] = b"["  # the JSON no longer parses
    open(p, "wb").write(bytes(data))
    t = manifest.read_table(store, manifest.CHUNKS)
    fixed = [checksum(bytes(data[r.offset:r.offset + r.length])) if (row["path"], row["offset"]) == (r.path, r.offset)
             else row[COLUMN] for row in t.select(["path", "offset", COLUMN]).to_pylist()]
    import pyarrow as pa

    t = t.set_column(t.column_names.index(COLUMN), COLUMN, pa.array(fixed, pa.string()))
    pq.write_table(t, store.path(manifest.CHUNKS))
    assert main(["verify", "--deep", store.uri]) == 1
    out = capsys.readouterr().out
    assert any(r.key in ln and "bad JSON" in ln for ln in out.splitlines()), out


def test_an_old_store_without_the_column_reads_unchecked_with_one_warning(store, caplog, capsys):
    t = manifest.read_table(store, manifest.CHUNKS).drop_columns([COLUMN])
    pq.write_table(t, store.path(manifest.CHUNKS))
    with caplog.at_level(logging.WARNING, logger="shards"):
        batches = list(StreamLoader(MixtureStream(cfg(store)), num_workers=0))
    assert batches and sum(int(b["n_skipped"]) for b in batches) == 0
    warned = [rec for rec in caplog.records if COLUMN in rec.getMessage()]
    assert len(warned) == 1 and "unchecked" in warned[0].getMessage()
    assert main(["verify", "--deep", store.uri]) == 0  # decoded; not a problem, only a warning
    assert os.path.exists(store.path(manifest.CHUNKS))


@pytest.mark.slow
def test_training_reports_the_skipped_samples_in_train_log_tensorboard_and_metrics(ray_cluster, tmp_path,
                                                                                    monkeypatch):
    """A 20-step run (Ray Train local mode: the loop runs in this process) on a store with one flipped
    sample: the skips it trained past are summed in train.log, TensorBoard and metrics.json."""
    import re

    import shards.stream.dataset
    from trainer.config import TrainConfig
    from trainer.train import run

    store = make_store(str(tmp_path / "s"), uneven_records())
    # one bad chunk of ~40 is more than 1% of an epoch's windows: lift the budget, count everything
    monkeypatch.setattr(shards.stream.dataset, "error_budget", lambda config, n_epoch: 10 ** 9)
    out = tmp_path / "run"
    cfg = TrainConfig(shards=store.uri, out=str(out), mix="ephys=1,ophys=1", preset="small", batch_size=8,
                      epoch_windows=400, workers=0, loader_workers=0, log_every=5, report_every=50,
                      max_steps=20, early_stop_patience=0)
    stream = MixtureStream(cfg.stream_config("train"))
    first = stream.plan().chunk[:160]  # the windows of the first 20 steps
    flip_spike_times(store, row=int(next(c for c in first if stream.chunks.modality.iloc[c] == "ephys")))
    expected, loader = 0, StreamLoader(MixtureStream(cfg.stream_config("train")), num_workers=0)
    for step, batch in enumerate(loader, 1):  # what those 20 steps read
        expected += int(batch["n_skipped"])
        if step == 20:
            break
    assert expected > 0
    metrics = run(cfg)
    assert metrics["step"] == 20 and metrics["skipped_samples"] == expected
    last = [ln for ln in open(out / "train.log") if re.match(r"[\d:]+ step 20/", ln)]
    assert last and last[-1].rstrip().endswith(f"skipped {expected}"), last
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    tb.Reload()
    values = [(e.step, e.value) for e in tb.Scalars("data/skipped_samples")]
    assert values[-1] == (20, expected) and [v for _, v in values] == sorted(v for _, v in values)
