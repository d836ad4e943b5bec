"""The mixture stream: exact ratios, equal ranks, resume (also elastic), corrupt samples, bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from shards import manifest
from shards.stream.dataset import CorruptSampleError, MixtureStream, StreamConfig
from shards.stream.loader import StreamLoader
from shards.stream.wire import transfer_groups
from tests.support.storegen import make_store, uneven_records


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("st") / "store"), uneven_records())


def cfg(store, **kw):
    base = dict(store=store.uri, mix="ephys=0.3,ophys=0.7", batch_size=8, seed=0, fetch_threads=2)
    base.update(kw)
    return StreamConfig(**base)


def batch_key(b):
    return {k: v.clone() for k, v in b.items()}


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("mix", ["ephys=0.3,ophys=0.7", "ephys=1,ophys=1", "ophys/VISp=1,ephys=2,ophys=1",
                                 "ephys/VISl=0.1,ephys/VISp/e2=0.2,ophys=0.7"])
def test_realised_fractions_are_exact_over_every_prefix(store, mix):
    s = MixtureStream(cfg(store, mix=mix, epoch_windows=997))
    plan = s.plan()
    w = np.array([sel.weight for sel in s.selectors])
    onehot = np.eye(len(w))[plan.selector]
    dev = np.cumsum(onehot, 0) - np.arange(1, len(plan) + 1)[:, None] * w
    assert np.abs(dev).max() <= 1 + 1e-6
    # and each window comes from its selector's data
    chunks = s.chunks
    for i, sel in enumerate(s.selectors):
        rows = chunks.iloc[plan.chunk[plan.selector == i]]
        assert (sel.matches(rows.modality.to_numpy(), rows.region.to_numpy(), rows.session_id.to_numpy())).all()


def test_batches_carry_the_planned_modalities(store):
    s = MixtureStream(cfg(store, epoch_windows=400))
    plan = s.plan()
    loader = StreamLoader(s, num_workers=0)
    n_ophys = 0
    for b in loader:
        pos = int(b["position"])
        assert torch.equal(b["modality"], torch.from_numpy((plan.selector[pos:pos + 8] == 1).astype(np.int64)))
        n_ophys += int(b["modality"].sum())
    assert n_ophys == int(round(0.7 * 400))


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_same_number_of_batches_and_no_window_twice(store, world):
    seen = []
    counts = []
    for rank in range(world):
        s = MixtureStream(cfg(store, batch_size=5), rank=rank, world_size=world)
        pos = s.positions(s.plan(), 0)
        counts.append(len(pos))
        seen.append(pos.reshape(-1))
    assert len(set(counts)) == 1 and counts[0] > 0
    allpos = np.concatenate(seen)
    assert len(np.unique(allpos)) == len(allpos)
    n = len(MixtureStream(cfg(store)).plan())
    assert len(allpos) == (n // (world * 5)) * world * 5  # only the tail that cannot fill a step is dropped


def test_windows_never_cross_a_split_or_a_chunk(store):
    s = MixtureStream(cfg(store))
    plan = s.plan()
    c = s.chunks.iloc[plan.chunk]
    assert (plan.t0 >= c.t_start.to_numpy() - 1e-9).all()
    assert (plan.t0 + 1.0 <= c.t_end.to_numpy() + 1e-9).all()
    assert set(c.split) == {"train"}
    sessions = manifest.read_table(store, manifest.SESSIONS).to_pandas()
    for (sid, reg), grp in c.assign(t0=plan.t0).groupby(["session_id", "region"]):
        sp = json.loads(sessions[(sessions.session_id == sid) & (sessions.region == reg)].splits.iloc[0])
        train = np.array(sp["train"])
        inside = ((grp.t0.to_numpy()[:, None] >= train[:, 0] - 1e-9) & (grp.t0.to_numpy()[:, None] + 1.0 <= train[:, 1] + 1e-9))
        assert inside.any(axis=1).all()
    for split in ("valid", "test"):
        ev = MixtureStream(cfg(store, split=split)).plan()
        ce = s.chunks.iloc[ev.chunk]
        assert set(ce.split) == {split}
        real = ~ev.pad
        assert len(np.unique(np.stack([ev.chunk[real], ev.t0[real]]), axis=1)[0]) == real.sum()


def test_workers_hand_over_exactly_the_in_process_batches(store):
    """Batches cross from workers in one shared buffer per group: same values, dtypes and shapes."""
    inproc = [batch_key(b) for b in StreamLoader(MixtureStream(cfg(store, epoch_windows=200)), num_workers=0)]
    workers = [batch_key(b) for b in StreamLoader(MixtureStream(cfg(store, epoch_windows=200)), num_workers=2)]
    same_batches(workers, inproc)
    for w, i in zip(workers, inproc):
        assert {k: (v.dtype, v.shape) for k, v in w.items()} == {k: (v.dtype, v.shape) for k, v in i.items()}


def test_eval_batches_carry_presentation_ids_through_workers_and_cover_every_presentation(store):
    """Validation on 2 ranks: overlapping windows (half a window apart) query every labelled presentation
    of the split; one id names one (task, label) per session; DataLoader workers deliver the in-process
    batches, the new key included."""
    from collections import OrderedDict

    c = cfg(store, split="valid", batch_size=4)
    inproc = [batch_key(b) for b in StreamLoader(MixtureStream(c, rank=1, world_size=2), num_workers=0)]
    workers = [batch_key(b) for b in StreamLoader(MixtureStream(c, rank=1, world_size=2), num_workers=2)]
    same_batches(workers, inproc)
    assert inproc[0]["output_presentation"].dtype == torch.int64 and inproc[0]["record_index"].dtype == torch.int64
    vocab = MixtureStream(c).vocab
    session_ids = sorted(vocab.sessions, key=vocab.sessions.get)
    record_session = {i: sid for (sid, _), i in vocab.records.items()}  # the record's session
    seen: dict[tuple, tuple] = {}
    windows_per: dict[tuple, int] = {}
    for rank in (0, 1):
        for b in StreamLoader(MixtureStream(c, rank=rank, world_size=2), num_workers=0):
            q = torch.repeat_interleave(torch.arange(len(b["modality"])), torch.diff(b["output_cu_seqlens"].long()))
            real = b["output_weights"] > 0
            assert [record_session[r] for r in b["record_index"].tolist()] == \
                [session_ids[i] for i in b["session_index"].tolist()]
            cols = [b["session_index"][q], b["output_task_index"], b["output_presentation"], b["output_labels"]]
            for sess, task, pid, label in zip(*(x[real].tolist() for x in cols)):
                assert seen.setdefault((sess, task, pid), (label,)) == (label,)
                windows_per[(sess, task, pid)] = windows_per.get((sess, task, pid), 0) + 1
    s = MixtureStream(c)
    expected = set()
    for row in np.nonzero((s.chunks.split == "valid").to_numpy())[0]:
        ch = s._decode(int(row), OrderedDict())
        assert ch.record == s.vocab.records[(s.chunks.session_id.iloc[row], s.chunks.region.iloc[row])]
        if ch.t_end - ch.t_start < 1.0 - 1e-9:
            continue
        inside = np.minimum(ch.q_end, ch.t_end) - np.maximum(ch.q_start, ch.t_start)
        ok = inside >= 0.5 * np.minimum(ch.q_end - ch.q_start, 1.0) - 1e-9
        expected |= {(ch.session, int(t), int(i)) for t, i in zip(ch.q_task[ok], ch.q_id[ok])}
    assert expected and expected <= set(seen)
    assert np.mean([n > 1 for n in windows_per.values()]) > 0.5  # windows overlap


@pytest.mark.parametrize("n,k,workers", [(40, 8, 2), (5, 8, 3), (100, 8, 1), (7, 1, 2), (0, 8, 2)])
def test_transfer_groups_cover_every_batch_once_in_order_starting_small(n, k, workers):
    groups = transfer_groups(n, k, workers)
    assert [i for g in groups for i in g] == list(range(n))
    assert all(1 <= len(g) <= k for g in groups)
    assert all(len(g) == 1 for g in groups[:workers])  # every worker's first item is one batch


def test_next_epoch_workers_start_early_and_deliver_the_same_batches(store):
    def epochs(prestart):
        loader = StreamLoader(MixtureStream(cfg(store, epoch_windows=160)), num_workers=2, prestart=prestart)
        out = [[batch_key(b) for b in loader] for _ in range(3)]
        return out, loader

    ahead, loader = epochs(True)
    plain, plain_loader = epochs(False)
    assert loader.prestarted_epochs == 2 and plain_loader.prestarted_epochs == 0
    for a, b in zip(ahead, plain):
        same_batches(a, b)
    assert not all(torch.equal(x["input_unit_index"], y["input_unit_index"]) for x, y in zip(ahead[0], ahead[1]))
    # a state loaded after the head start was made: the stale workers are not used
    loader.load_state_dict({**loader.state_dict(), "epoch": 1, "consumed_windows": 0})
    same_batches([batch_key(b) for b in loader], plain[1])


def test_resume_with_two_workers_yields_the_uninterrupted_batches(store):
    full = [batch_key(b) for b in StreamLoader(MixtureStream(cfg(store, epoch_windows=240)), num_workers=2)]
    first = StreamLoader(MixtureStream(cfg(store, epoch_windows=240)), num_workers=2)
    head = []
    for b in first:
        head.append(batch_key(b))
        if len(head) == 7:
            break
    state = first.state_dict()
    assert len(json.dumps(state)) < 4096
    resumed = StreamLoader(MixtureStream(cfg(store, epoch_windows=240)), num_workers=2)
    resumed.load_state_dict(state)
    tail = [batch_key(b) for b in resumed]
    same_batches(head + tail, full)


def test_elastic_resume_on_another_world_size_continues_the_global_order(store):
    c2 = cfg(store, batch_size=4, epoch_windows=200)
    ranks = [MixtureStream(c2, rank=r, world_size=2) for r in range(2)]
    loaders = [StreamLoader(s, num_workers=0) for s in ranks]
    its = [iter(ld) for ld in loaders]
    consumed = []
    for _ in range(5):
        for it in its:
            consumed.append(int(next(it)["position"]))
    state = loaders[0].state_dict()
    assert state["consumed_windows"] == 5 * 2 * 4
    one = StreamLoader(MixtureStream(cfg(store, batch_size=4, epoch_windows=200), rank=0, world_size=1), num_workers=2)
    one.load_state_dict(state)
    rest = [int(b["position"]) for b in one]
    starts = sorted(consumed + rest)
    assert starts == list(range(0, 200, 4))  # every window of the epoch exactly once, in global order


def test_unit_dropout_only_in_training_and_seeded(store):
    a = next(iter(StreamLoader(MixtureStream(cfg(store)), num_workers=0)))
    b = next(iter(StreamLoader(MixtureStream(cfg(store)), num_workers=0)))
    c = next(iter(StreamLoader(MixtureStream(cfg(store, unit_dropout=False)), num_workers=0)))
    assert torch.equal(a["input_unit_index"], b["input_unit_index"])
    assert len(c["input_unit_index"]) > len(a["input_unit_index"])


def test_calcium_noise_only_in_training_seeded_and_only_on_calcium_tokens(store):
    def first(**kw):
        return next(iter(StreamLoader(MixtureStream(cfg(store, **kw)), num_workers=0)))

    clean, noisy, again = first(), first(calcium_noise=0.3), first(calcium_noise=0.3)
    assert torch.equal(noisy["input_values"], again["input_values"])  # seeded: a rerun reads the same batch
    for k in clean:
        if k != "input_values":
            assert torch.equal(clean[k], noisy[k]), k
    d = noisy["input_values"] - clean["input_values"]
    calcium = torch.repeat_interleave(clean["modality"] == 1, torch.diff(clean["input_cu_seqlens"]))
    assert calcium.any() and (~calcium).any()
    assert torch.equal(d[~calcium], torch.zeros_like(d[~calcium]))
    assert abs(float(d[calcium].std()) - 0.3) < 0.05
    valid = [first(split="valid", **kw) for kw in ({}, {"calcium_noise": 0.3})]
    same_batches(valid[:1], valid[1:])


def _corrupt_one_sample(store):
    chunks = manifest.read_table(store, manifest.CHUNKS).to_pandas()
    r = chunks[chunks.split == "train"].iloc[3]
    p = store.path(r.path)
    data = bytearray(open(p, "rb").read())
    start = r.offset + 512  # inside the JSON member's data
    data[start:start + 8] = b"\xff" * 8
    open(p, "wb").write(bytes(data))
    return r


def test_corrupt_member_is_skipped_leniently_and_raises_in_strict_mode(tmp_path):
    store = make_store(str(tmp_path / "s"), uneven_records()[:2])
    r = _corrupt_one_sample(store)
    lenient = StreamLoader(MixtureStream(cfg(store, mix="ephys=1", error_budget=0.5)), num_workers=0)
    batches = list(lenient)
    assert sum(int(b["n_skipped"]) for b in batches) > 0
    assert lenient.state.epoch == 1
    with pytest.raises(CorruptSampleError, match=r.key):
        list(StreamLoader(MixtureStream(cfg(store, mix="ephys=1", strict=True)), num_workers=0))
    with pytest.raises(CorruptSampleError, match="error budget"):
        list(StreamLoader(MixtureStream(cfg(store, mix="ephys=1", error_budget=0.0)), num_workers=0))


@pytest.mark.parametrize("mix,err", [
    ("spikes=1", "unknown selector 'spikes'"),
    ("ephys=0,ophys=0", "sum to zero"),
    ("ephys/VISam=1", "'ephys/VISam' matches no shard"),
    ("ephys=abc", "not a number"),
])
def test_bad_mixtures_fail_before_training_with_the_selector_named(store, mix, err):
    with pytest.raises(ValueError, match=err):
        MixtureStream(cfg(store, mix=mix))


def test_missing_manifest_and_absent_shard_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.parquet"):
        MixtureStream(cfg(type("S", (), {"uri": str(tmp_path)})()))
    store = make_store(str(tmp_path / "s"), uneven_records()[:1])
    victim = manifest.read_table(store, manifest.MANIFEST).column("path")[0].as_py()
    os.remove(store.path(victim))
    with pytest.raises(FileNotFoundError, match=victim):
        MixtureStream(cfg(store, mix="ephys=1"))
