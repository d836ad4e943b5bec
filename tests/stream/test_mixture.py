"""Mixture selectors and the exact interleave, tested as pure functions: no store, no torch."""

from __future__ import annotations

import numpy as np
import pytest

from shards.stream.mixture import Selector, assign, interleave, parse_mix

# four rows: (modality, region, session)
MODALITY = np.array(["ephys", "ephys", "ophys", "ophys"])
REGION = np.array(["VISp", "VISl", "VISp", "VISam"])
SESSION = np.array(["e1", "e2", "o1", "o1"])


def test_parse_mix_normalises_weights_and_reads_every_part():
    sels = parse_mix(" ephys=1, ophys/VISp=3 ,ophys/VISam/o1=4,")
    assert [(s.modality, s.region, s.session) for s in sels] == [
        ("ephys", None, None), ("ophys", "VISp", None), ("ophys", "VISam", "o1")]
    assert [s.weight for s in sels] == pytest.approx([0.125, 0.375, 0.5])
    assert [s.name for s in sels] == ["ephys", "ophys/VISp", "ophys/VISam/o1"]
    assert [s.specificity for s in sels] == [1, 2, 3]


def test_parse_mix_defaults_a_weight_to_one_and_drops_zero_weights():
    sels = parse_mix("ephys,ophys=3,ophys/VISp=0")
    assert [(s.name, s.weight) for s in sels] == [("ephys", 0.25), ("ophys", 0.75)]


@pytest.mark.parametrize("text,named", [
    ("spikes=1", "unknown selector 'spikes'"),
    ("ephys=1,lfp/VISp=1", "unknown selector 'lfp/VISp'"),
    ("ephys/VISp/e1/extra=1", "unknown selector 'ephys/VISp/e1/extra'"),
    ("ephys//e1=1", "unknown selector 'ephys//e1'"),
    ("ephys=abc", "--mix 'ephys=abc': weight 'abc' is not a number"),
    ("ophys=1,ephys=-1", "--mix 'ephys=-1': weight must be a finite number >= 0"),
    ("ephys=inf", "--mix 'ephys=inf': weight must be a finite number >= 0"),
    ("ephys=1,ophys=1,ephys=2", "names selector 'ephys' twice"),
    ("ephys=0,ophys=0", "weights sum to zero"),
    ("  ", "empty --mix"),
])
def test_parse_mix_errors_name_the_bad_selector(text, named):
    with pytest.raises(ValueError) as err:
        parse_mix(text)
    assert named in str(err.value)


def test_a_selector_matches_its_modality_region_and_session_and_a_star_region_matches_any():
    assert Selector("ephys").matches(MODALITY, REGION, SESSION).tolist() == [True, True, False, False]
    assert Selector("ophys", "VISp").matches(MODALITY, REGION, SESSION).tolist() == [False, False, True, False]
    assert Selector("ephys", "*", "e2").matches(MODALITY, REGION, SESSION).tolist() == [False, True, False, False]


def test_assign_gives_each_row_its_most_specific_selector():
    owner = assign(parse_mix("ophys=1,ophys/VISp=1,ephys=1"), MODALITY, REGION, SESSION)
    assert owner.tolist() == [2, 2, 1, 0]  # VISp OPhys to its own selector, the other OPhys to "ophys"
    owner = assign(parse_mix("ephys/VISl=1"), MODALITY, REGION, SESSION)
    assert owner.tolist() == [-1, 0, -1, -1]  # rows no selector names are in no selector


def test_assign_names_a_selector_that_matches_nothing_or_only_data_of_more_specific_ones():
    with pytest.raises(ValueError, match="'ephys/VISam' matches no shard"):
        assign(parse_mix("ephys=1,ephys/VISam=1"), MODALITY, REGION, SESSION)
    with pytest.raises(ValueError, match="'ephys' only matches data claimed by more specific selectors"):
        assign(parse_mix("ephys=1,ephys/VISp=1,ephys/VISl=1"), MODALITY, REGION, SESSION)


@pytest.mark.parametrize("weights,n,counts", [
    ([0.3, 0.7], 1000, [300, 700]),
    ([0.2, 0.3, 0.5], 1000, [200, 300, 500]),
    ([0.1, 0.2, 0.7], 10, [1, 2, 7]),
    ([1, 1, 1], 999, [333, 333, 333]),
    ([0.25, 0.75], 7, [2, 5]),  # 1.75 and 5.25: each within one window of its share
])
def test_interleave_realises_the_exact_counts_and_every_prefix_is_within_one_window(weights, n, counts):
    seq = interleave(np.array(weights, dtype=float), n, seed=3)
    assert np.bincount(seq, minlength=len(weights)).tolist() == counts
    w = np.array(weights, dtype=float) / sum(weights)
    prefix = np.cumsum(np.eye(len(w))[seq], axis=0) - np.arange(1, n + 1)[:, None] * w
    assert np.abs(prefix).max() <= 1 + 1e-9


def test_interleave_is_deterministic_per_seed_and_the_seed_breaks_ties():
    w = np.array([1.0, 1.0, 1.0])
    assert interleave(w, 300, seed=0).tolist() == interleave(w, 300, seed=0).tolist()
    assert interleave(w, 300, seed=0).tolist() != interleave(w, 300, seed=1).tolist()
    assert interleave(w, 6, seed=0).tolist() == [0, 2, 1, 0, 2, 1]  # equal weights: round robin in the seed's order


@pytest.mark.parametrize("w0,seed", [(0.3, 4), (0.37, 7)])
def test_two_selectors_hold_their_share_within_one_window_on_every_run(w0, seed):
    seq = interleave(np.array([w0, 1 - w0]), 3000, seed=seed)
    c = np.concatenate([[0], np.cumsum(seq == 0)]) - w0 * np.arange(3001)
    assert c.max() - c.min() <= 1 + 1e-9  # any run [i, j) holds c[j] - c[i] off its share
