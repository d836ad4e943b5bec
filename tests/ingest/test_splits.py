import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.chunks import chunk_bounds
from ingest.records import Intervals
from ingest.splits import SPLITS, SplitConfig, assign_splits, epochs


def _gratings(t0, n, dur, gap=0.0, task="static_gratings"):
    start = t0 + np.arange(n) * (dur + gap)
    return Intervals(task, start, start + dur, np.arange(n) % 6)


def _total(ivs):
    return sum(b - a for a, b in ivs)


def test_each_stimulus_epoch_splits_60_10_30_by_time():
    stim = [_gratings(0.0, 400, 0.25), _gratings(200.0, 50, 2.0, gap=1.0, task="drifting_gratings")]
    out = assign_splits("s", "VISp", 0.0, 400.0, stim, SplitConfig(block_s=10.0))
    # epoch 1 = 0..100 s (10 blocks): exactly 6/1/3 blocks
    ep = (0.0, 100.0)
    inside = {s: sum(max(0, min(b, ep[1]) - max(a, ep[0])) for a, b in out[s]) for s in SPLITS}
    assert abs(inside["train"] - 60) < 0.3 and abs(inside["valid"] - 10) < 0.3 and abs(inside["test"] - 30) < 0.3


def test_splits_cover_session_disjointly_and_never_cut_a_presentation():
    stim = [_gratings(3.1, 300, 0.25), _gratings(90.0, 30, 2.0, gap=1.0, task="drifting_gratings")]
    out = assign_splits("s", "VISp", 0.0, 200.0, stim, SplitConfig(block_s=7.0))
    all_iv = sorted(iv for s in SPLITS for iv in out[s])
    assert abs(all_iv[0][0] - 0.0) < 1e-9 and abs(all_iv[-1][1] - 200.0) < 1e-9
    for (_, b0), (a1, _) in zip(all_iv, all_iv[1:]):
        assert abs(b0 - a1) < 1e-9  # contiguous, no overlap
    edges = {b for s in SPLITS for _, b in out[s]}
    for iv in stim:
        for a, b in zip(iv.start, iv.end):
            assert not any(a + 1e-9 < e < b - 1e-9 for e in edges)


def test_split_is_seeded_and_depends_on_session():
    stim = [_gratings(0.0, 800, 0.25)]
    a = assign_splits("s1", "VISp", 0.0, 200.0, stim, SplitConfig(seed=0))
    b = assign_splits("s1", "VISp", 0.0, 200.0, stim, SplitConfig(seed=0))
    c = assign_splits("s1", "VISp", 0.0, 200.0, stim, SplitConfig(seed=1))
    d = assign_splits("s2", "VISp", 0.0, 200.0, stim, SplitConfig(seed=0))
    assert a == b and (a != c or a != d)


def test_session_without_stimuli_is_one_epoch():
    assert epochs(0.0, 50.0, [], 5.0) == [(0.0, 50.0)]
    out = assign_splits("s", "x", 0.0, 100.0, [])
    assert abs(_total(out["train"]) - 60) < 1e-6 and abs(_total(out["test"]) - 30) < 1e-6


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 1000), st.floats(0.5, 500), st.floats(0.5, 30))
def test_chunks_tile_their_interval(a, length, chunk_s):
    ch = chunk_bounds(a, a + length, chunk_s)
    assert abs(ch[0][0] - a) < 1e-9 and abs(ch[-1][1] - (a + length)) < 1e-6
    assert all(abs(x[1] - y[0]) < 1e-9 for x, y in zip(ch, ch[1:]))
    if length >= chunk_s:
        assert all(chunk_s / 1.5 - 1e-9 <= b - a0 <= chunk_s * 1.5 + 1e-9 for a0, b in ch)
