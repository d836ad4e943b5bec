"""Calcium inputs: OPhys windows that read ahead (``calcium_lag_s``: which frames, which stamps, the batch that
says so) and the dF/F scale the encoder reads (``calcium_scale``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shards.stream.tokens import DecodedChunk, TokenConfig, pack, window_tokens
from trainer.model.config import ModelConfig
from trainer.model.network import MultiModalPOYO


def _ophys_chunk() -> DecodedChunk:
    frames = np.arange(0, 10, 1 / 30)
    dff = np.arange(len(frames) * 2, dtype=np.float32).reshape(len(frames), 2)  # value = 2 * frame + roi
    qs = np.arange(0, 10, 0.25)
    return DecodedChunk("k", 1, 0, 0.0, 10.0, np.array([4, 9]), frames, None, dff, np.zeros(len(qs), np.int64),
                        qs, qs + 0.25, np.arange(len(qs)) % 6)


@pytest.mark.parametrize("lag", [0.0, 0.25, 0.5])
def test_ophys_window_reads_frames_lag_later_and_stamps_them_lag_earlier(lag):
    c = _ophys_chunk()
    units, times, values, q_times, *_ = window_tokens(c, 3.0, TokenConfig(calcium_lag_s=lag), None)
    frame = values.astype(np.int64) // 2  # the frame each token came from
    expected = np.nonzero((c.times >= 3.0 + lag) & (c.times < 4.0 + lag))[0]
    assert np.array_equal(np.unique(frame), expected)
    np.testing.assert_allclose(times, c.times[frame] - 3.0 - lag, atol=1e-5)
    assert times.min() >= -1e-6 and times.max() < 1.0
    assert units.tolist() == [4, 9] * len(expected)
    # the queries do not move: presentations of [3, 4) at their midpoints
    np.testing.assert_allclose(q_times, np.arange(3.125, 4.0, 0.25) - 3.0, atol=1e-6)


def test_a_window_near_the_chunk_end_reads_only_the_frames_there():
    c = _ophys_chunk()
    _, times, values, *_ = window_tokens(c, 9.0, TokenConfig(calcium_lag_s=0.5), None)
    frame = values.astype(np.int64) // 2
    assert c.times[frame].min() >= 9.5 - 1e-9 and frame.max() == len(c.times) - 1
    assert times.max() < 0.5


def test_calcium_noise_is_fresh_gaussian_noise_on_calcium_values_only_and_needs_a_generator():
    c = _ophys_chunk()
    clean = window_tokens(c, 3.0, TokenConfig(), None)
    noisy = [window_tokens(c, 3.0, TokenConfig(calcium_noise=0.5), np.random.default_rng(s)) for s in (1, 2)]
    for out in noisy:
        for i in (0, 1, 3, 4, 5, 6):  # units, times and queries untouched
            assert np.array_equal(out[i], clean[i])
        d = out[2] - clean[2]
        assert abs(d.std() - 0.5) < 0.1 and abs(d.mean()) < 0.15
    assert not np.array_equal(noisy[0][2], noisy[1][2])  # another draw each time the window is read
    assert np.array_equal(window_tokens(c, 3.0, TokenConfig(calcium_noise=0.5), None)[2], clean[2])  # evaluation
    rng = np.random.default_rng(0)
    spikes = np.sort(rng.uniform(0, 10, 300))
    e = DecodedChunk("k", 0, 0, 0.0, 10.0, np.arange(3), spikes, rng.integers(0, 3, 300).astype(np.int32), None,
                     np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
    a = window_tokens(e, 2.0, TokenConfig(), None)
    b = window_tokens(e, 2.0, TokenConfig(calcium_noise=0.5), np.random.default_rng(0))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # spikes carry no value to perturb


def test_spikes_ignore_the_lag():
    rng = np.random.default_rng(0)
    spikes = np.sort(rng.uniform(0, 10, 300))
    c = DecodedChunk("k", 0, 0, 0.0, 10.0, np.arange(3), spikes, rng.integers(0, 3, 300).astype(np.int32), None,
                     np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
    a = window_tokens(c, 2.0, TokenConfig(), None)
    b = window_tokens(c, 2.0, TokenConfig(calcium_lag_s=0.25), None)
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_the_batch_carries_a_lag_and_a_model_built_for_another_refuses_it():
    c = _ophys_chunk()
    wins = [window_tokens(c, t, TokenConfig(calcium_lag_s=0.25), None) for t in (1.0, 5.0)]
    assert "calcium_lag_s" not in pack(wins, [1, 1], [0, 0], 1.0)  # no lag: the batch is as before
    batch = {k: torch.as_tensor(v) for k, v in pack(wins, [1, 1], [0, 0], 1.0, calcium_lag_s=0.25).items()}
    assert float(batch["calcium_lag_s"]) == 0.25
    batch["input_unit_index"] = batch["input_unit_index"] % 10
    batch["input_values"] = batch["input_values"] / 1000
    matched = MultiModalPOYO(config=ModelConfig.small(calcium_lag_s=0.25, calcium_bin=1), n_units=10, n_sessions=1)
    assert torch.isfinite(matched(batch)["loss"])
    other = MultiModalPOYO(config=ModelConfig.small(calcium_bin=1), n_units=10, n_sessions=1)
    with pytest.raises(ValueError, match="calcium_lag_s = 0.0"):
        other(batch)


def test_a_lag_outside_the_window_is_a_config_error():
    with pytest.raises(ValueError, match="calcium_lag_s"):
        ModelConfig.small(calcium_lag_s=1.0)


def test_calcium_scale_is_the_same_as_scaling_the_dff():
    c = _ophys_chunk()
    wins = [window_tokens(c, t, TokenConfig(), None) for t in (1.0, 5.0)]
    batch = {k: torch.as_tensor(v) for k, v in pack(wins, [1, 1], [0, 0], 1.0).items()}
    batch["input_unit_index"] = batch["input_unit_index"] % 10
    batch["input_values"] = batch["input_values"] / 1000
    torch.manual_seed(0)
    scaled = MultiModalPOYO(config=ModelConfig.small(calcium_scale=7.0, calcium_bin=1), n_units=10, n_sessions=1)
    plain = MultiModalPOYO(config=ModelConfig.small(calcium_bin=1), n_units=10, n_sessions=1)
    plain.load_state_dict(scaled.state_dict())
    a = scaled(batch)["logits"]["static_gratings"]
    b = plain({**batch, "input_values": batch["input_values"] * 7.0})["logits"]["static_gratings"]
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain(batch)["logits"]["static_gratings"])


@pytest.mark.parametrize("k", [2, 3, 7])
def test_calcium_bin_averages_k_frames_per_roi_at_their_mean_time(k):
    c = _ophys_chunk()
    plain = window_tokens(c, 3.0, TokenConfig(), None)
    units, times, values, q_times, *_ = window_tokens(c, 3.0, TokenConfig(calcium_bin=k), None)
    frames = np.nonzero((c.times >= 3.0) & (c.times < 4.0))[0]
    groups = [frames[i:i + k] for i in range(0, len(frames), k)]  # the last one may be shorter
    assert len(units) == 2 * len(groups) and units.tolist() == [4, 9] * len(groups)
    want_v = np.array([[c.dff[g, r].mean() for r in (0, 1)] for g in groups]).reshape(-1)
    want_t = np.repeat([c.times[g].mean() - 3.0 for g in groups], 2)
    np.testing.assert_allclose(values, want_v, rtol=1e-6)
    np.testing.assert_allclose(times, want_t, atol=1e-6)
    np.testing.assert_array_equal(q_times, plain[3])  # queries do not depend on the binning


def test_a_binned_batch_says_so_and_a_model_built_for_other_bins_refuses_it():
    c = _ophys_chunk()
    wins = [window_tokens(c, t, TokenConfig(calcium_bin=3), None) for t in (1.0, 5.0)]
    assert int(pack(wins, [1, 1], [0, 0], 1.0)["calcium_bin"]) == 1  # every packed batch says how it was binned
    batch = {k: torch.as_tensor(v) for k, v in pack(wins, [1, 1], [0, 0], 1.0, calcium_bin=3).items()}
    assert int(batch["calcium_bin"]) == 3
    batch["input_values"] = batch["input_values"] / 1000
    torch.manual_seed(0)
    matched = MultiModalPOYO(config=ModelConfig.small(calcium_bin=3), n_units=10, n_sessions=1)
    assert torch.isfinite(matched(batch)["loss"])
    with pytest.raises(ValueError, match="calcium_bin = 1"):
        MultiModalPOYO(config=ModelConfig.small(calcium_bin=1), n_units=10, n_sessions=1)(batch)
    with pytest.raises(ValueError, match="calcium_bin"):
        ModelConfig.small(calcium_bin=0)
