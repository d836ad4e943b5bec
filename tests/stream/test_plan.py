"""The epoch plan as pure functions on a chunk table made here: no store, no torch, no fetching.

What a rank reads is decided by ``shards.stream.plan`` alone, so the mixture, the determinism, the
equal ranks and the resume (also on another world size) are checked on its arrays."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shards.stream import plan as planning
from shards.stream.mixture import parse_mix

# (session, modality, region, number of train chunks); every chunk is 3.5 s: 3 whole 1-s windows
RECORDS = [("e1", "ephys", "VISp", 6), ("e1", "ephys", "VISl", 4), ("e2", "ephys", "VISp", 5),
           ("o1", "ophys", "VISp", 8), ("o2", "ophys", "VISam", 3)]


def chunk_table() -> pd.DataFrame:
    """Train chunks of 3.5 s, one 0.5-s train chunk per record (shorter than a window: never planned),
    and valid chunks of 2.2 s and 1.0 s."""
    rows = []
    for sid, modality, region, n in RECORDS:
        t = 0.0
        for split, length in [("train", 3.5)] * n + [("train", 0.5), ("valid", 2.2), ("valid", 1.0)]:
            rows.append(dict(session_id=sid, modality=modality, region=region, split=split, t_start=t,
                             t_end=t + length))
            t += length + 0.25
    return pd.DataFrame(rows)


CHUNKS = chunk_table()
TRAIN_SLOTS = 3 * sum(n for *_, n in RECORDS)  # the natural epoch size: 78 windows


def plan(mix="ephys=0.3,ophys=0.7", epoch=0, **kw):
    return planning.plan_train_epoch(CHUNKS, parse_mix(mix), epoch, planning.PlanConfig(**kw))


# ---- seeds ---------------------------------------------------------------------------------------
def test_epoch_rng_is_a_function_of_its_whole_key():
    draw = lambda *key: planning.epoch_rng(*key).random(4).tolist()  # noqa: E731
    assert draw(0, 1, "dropout", 5) == draw(0, 1, "dropout", 5)
    others = [draw(1, 1, "dropout", 5), draw(0, 2, "dropout", 5), draw(0, 1, "dropout", 6), draw(0, 1, "slots", 5)]
    assert all(o != draw(0, 1, "dropout", 5) for o in others) and len({tuple(o) for o in others}) == 4


def test_a_plan_is_determined_by_seed_and_epoch_and_changes_with_either():
    a, b = plan(seed=3, epoch_windows=400), plan(seed=3, epoch_windows=400)
    for x, y in ((a.chunk, b.chunk), (a.t0, b.t0), (a.selector, b.selector)):
        assert np.array_equal(x, y)
    other_seed, other_epoch = plan(seed=4, epoch_windows=400), plan(seed=3, epoch=1, epoch_windows=400)
    assert not np.array_equal(a.chunk, other_seed.chunk) and not np.array_equal(a.t0, other_seed.t0)
    assert not np.array_equal(a.chunk, other_epoch.chunk) and not np.array_equal(a.t0, other_epoch.t0)


# ---- the mixture ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mix,n,counts", [
    ("ephys=0.3,ophys=0.7", 1000, [300, 700]),  # each selector far more often than it has windows: repeats
    ("ephys=0.3,ophys=0.7", 20, [6, 14]),  # fewer: a subsample
    ("ophys/VISp=1,ephys=2,ophys=1", 400, [100, 200, 100]),
    ("ephys/VISl=1,ephys/VISp/e2=1,ophys=2", 64, [16, 16, 32]),
])
def test_the_realised_mixture_is_exact_and_each_window_comes_from_its_selector(mix, n, counts):
    p = plan(mix, epoch_windows=n)
    assert len(p) == n and np.bincount(p.selector, minlength=len(counts)).tolist() == counts
    for i, sel in enumerate(p.selectors):
        rows = CHUNKS.iloc[p.chunk[p.selector == i]]
        assert sel.matches(rows.modality.to_numpy(), rows.region.to_numpy(), rows.session_id.to_numpy()).all()
    if "VISp=" in mix:  # the most specific selector wins: "ophys" takes no VISp OPhys
        other = CHUNKS.iloc[p.chunk[p.selector == 2]]
        assert set(other.region) == {"VISam"}


def test_the_natural_epoch_uses_every_train_window_once_per_selector_share():
    p = plan("ephys=1,ophys=1")
    assert len(p) == TRAIN_SLOTS and np.bincount(p.selector).tolist() == [39, 39]
    # OPhys holds 33 windows: its 39 take one whole pass and 6 of a re-shuffled second one
    ophys_rows = p.chunk[p.selector == 1]
    assert len(np.unique(ophys_rows)) == 11 and np.bincount(ophys_rows)[np.unique(ophys_rows)].min() >= 3


def test_windows_lie_inside_train_chunks_that_hold_a_whole_window():
    p = plan(epoch_windows=500)
    rows = CHUNKS.iloc[p.chunk]
    assert set(rows.split) == {"train"} and ((rows.t_end - rows.t_start) >= 1.0).all()
    assert (p.t0 >= rows.t_start.to_numpy()).all() and (p.t0 + 1.0 <= rows.t_end.to_numpy() + 1e-9).all()
    assert not p.pad.any()


def test_sessions_include_and_exclude_filter_before_planning():
    kept = CHUNKS.iloc[plan("ephys=1,ophys=1", sessions_exclude=("e1",), epoch_windows=200).chunk]
    assert "e1" not in set(kept.session_id) and {"e2", "o1", "o2"} <= set(kept.session_id)
    only = CHUNKS.iloc[plan("ephys=1", sessions_include=("e2",), epoch_windows=50).chunk]
    assert set(only.session_id) == {"e2"}


def test_a_train_fraction_keeps_the_same_share_of_every_record_in_every_epoch():
    def chunks_of(fraction, seed=0, epoch=0):
        return set(plan("ephys=1,ophys=1", epoch=epoch, seed=seed, epoch_windows=2000, train_fraction=fraction).chunk)

    half = chunks_of(0.5)
    per_record = CHUNKS.iloc[sorted(half)].groupby(["session_id", "region"]).size().to_dict()
    # round(0.5 * n) of each record's n whole-window train chunks, at least one (o2 has 3: 2 kept, 1.5 rounds to 2)
    assert per_record == {(sid, region): max(1, round(0.5 * n)) for sid, _, region, n in RECORDS}
    assert chunks_of(0.5, epoch=3) == half  # the subset is the run's, not the epoch's
    assert chunks_of(0.25) < half < chunks_of(1.0)  # nested: one permutation per record
    assert chunks_of(0.5, seed=1) != half
    assert len(plan("ephys=1,ophys=1", train_fraction=0.5)) == 3 * sum(per_record.values())  # the natural epoch shrinks


# ---- ranks, steps and resume ---------------------------------------------------------------------
@pytest.mark.parametrize("n,world,batch", [(78, 1, 8), (78, 3, 5), (1000, 4, 8), (31, 2, 4), (7, 2, 4)])
def test_every_rank_gets_the_same_number_of_batches_and_no_window_twice(n, world, batch):
    per_rank = [planning.rank_positions(n, r, world, batch) for r in range(world)]
    steps = n // (world * batch)
    assert [p.shape for p in per_rank] == [(steps, batch)] * world and planning.n_batches(n, world, batch) == steps
    used = np.sort(np.concatenate([p.reshape(-1) for p in per_rank]))
    assert used.tolist() == list(range(steps * world * batch))  # only the tail that cannot fill a step is dropped
    assert n - len(used) < world * batch
    if steps:  # rank r takes the r-th batch of each step
        assert per_rank[world - 1][0].tolist() == list(range((world - 1) * batch, world * batch))


def test_resuming_mid_epoch_gives_exactly_the_remaining_batches():
    for rank in range(3):
        full = planning.rank_positions(1000, rank, 3, 8)
        for done in (0, 1, 17, len(full) - 1, len(full)):
            assert np.array_equal(planning.rank_positions(1000, rank, 3, 8, start_window=done * 24), full[done:])
    assert planning.n_batches(1000, 3, 8, start_window=17 * 24) == 41 - 17 and planning.n_batches(1000, 3, 8, 2000) == 0


@pytest.mark.parametrize("before,after", [((2, 4), (1, 4)), ((1, 4), (2, 4)), ((2, 4), (3, 4)), ((4, 2), (3, 5))])
def test_a_world_or_batch_size_change_continues_the_global_order(before, after):
    """k steps on one (world size, batch size), then the rest of the epoch on another: every window
    of the epoch once, in order, up to a dropped tail shorter than one step of the new shape."""
    n, (w1, b1), (w2, b2) = 200, before, after
    for k in (0, 3, 7):
        consumed = k * w1 * b1
        seen = np.concatenate([planning.rank_positions(n, r, w1, b1)[:k].reshape(-1) for r in range(w1)]
                              + [planning.rank_positions(n, r, w2, b2, start_window=consumed).reshape(-1) for r in range(w2)])
        assert len(np.unique(seen)) == len(seen)
        assert np.sort(seen).tolist() == list(range(len(seen))) and n - len(seen) < w2 * b2
        counts = {len(planning.rank_positions(n, r, w2, b2, start_window=consumed)) for r in range(w2)}
        assert counts == {planning.n_batches(n, w2, b2, consumed)}


@pytest.mark.parametrize("rank,world,batch,start", [(2, 2, 4, 0), (-1, 2, 4, 0), (0, 1, 0, 0), (0, 1, 4, -4)])
def test_rank_positions_refuses_a_rank_outside_the_world_and_empty_batches(rank, world, batch, start):
    with pytest.raises(ValueError, match="rank"):
        planning.rank_positions(100, rank, world, batch, start)


# ---- evaluation ----------------------------------------------------------------------------------
def test_eval_windows_slide_by_the_stride_end_flush_and_pad_to_whole_steps():
    p = planning.plan_eval(CHUNKS, "valid", planning.PlanConfig(), world_size=2, batch_size=4)
    real = ~p.pad
    # each 2.2-s chunk: starts 0, 0.5 and 1.0, then one flush with its end (1.2); a 1.0-s chunk: one window
    assert int(real.sum()) == len(RECORDS) * (4 + 1) and len(p) % 8 == 0 and len(p) - real.sum() < 8
    assert p.pad[int(real.sum()):].all() and not p.pad[:int(real.sum())].any()  # padding only at the end
    first = CHUNKS.iloc[p.chunk[:4]]
    assert (p.t0[:4] - first.t_start.to_numpy()).round(9).tolist() == [0.0, 0.5, 1.0, 1.2]
    rows = CHUNKS.iloc[p.chunk]
    assert set(rows.split) == {"valid"} and (p.t0 + 1.0 <= rows.t_end.to_numpy() + 1e-9).all()
    assert (p.selector == -1).all()


def test_eval_stride_must_lie_in_zero_to_one_window():
    assert planning.eval_stride(planning.PlanConfig(window_s=2.0)) == 1.0
    for bad in (0.0, -1.0, 1.5):
        with pytest.raises(ValueError, match="eval_stride_s"):
            planning.eval_stride(planning.PlanConfig(window_s=1.0, eval_stride_s=bad))
