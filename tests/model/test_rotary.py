"""The rotary time embedding (trainer.model.rotary): relative-time scores, partial rotation, the
half-precision fallback."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.model.rotary import RotaryTimeEmbedding, rotate, rotate_into


def test_rotary_scores_depend_only_on_time_difference():
    rope = RotaryTimeEmbedding(dim_head=16, t_min=1e-4, t_max=4.0)
    periods = 2 * math.pi / rope.omega.double()
    assert periods[0].item() == pytest.approx(1e-4, rel=1e-4) and periods[-1].item() == pytest.approx(4.0, rel=1e-4)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    def score(tq, tk):
        return (rotate(q, rope(torch.tensor([tq]))) * rotate(k, rope(torch.tensor([tk])))).sum().item()
    # times exact in float32, so only the rotation's own rounding is left
    assert score(0.25, 0.125) == pytest.approx(score(0.75, 0.625), abs=1e-5)
    assert score(0.25, 0.125) != pytest.approx(score(0.25, 0.1875), abs=1e-3)


def test_partial_rotary_leaves_the_content_half_of_each_head_unrotated():
    rope = RotaryTimeEmbedding(dim_head=16, t_min=1e-2, t_max=4.0, rotate_frac=0.5)
    periods = 2 * math.pi / rope.omega[:4].double()
    assert periods[0].item() == pytest.approx(1e-2, rel=1e-4) and periods[3].item() == pytest.approx(4.0, rel=1e-4)
    assert (rope.omega[4:] == 0).all()
    x = torch.randn(3, 1, 16)
    y = rotate(x, rope(torch.tensor([0.1, 0.4, 0.9])))
    torch.testing.assert_close(y[..., 8:], x[..., 8:])  # pairs 4..7: identity at every time
    assert not torch.allclose(y[..., :8], x[..., :8])
    with pytest.raises(ValueError, match="rotate_frac"):
        RotaryTimeEmbedding(dim_head=16, t_min=1e-2, t_max=4.0, rotate_frac=0.0)


def test_rotation_fallback_for_half_precision_matches_the_complex_path():
    rope = RotaryTimeEmbedding(dim_head=8, t_min=1e-4, t_max=4.0)(torch.rand(50))
    x = torch.randn(50, 3, 8)
    fast = rotate_into(x, rope)
    torch.testing.assert_close(rotate_into(x.double(), rope).float(), fast)
    torch.testing.assert_close(rotate_into(x.bfloat16(), rope).float(), fast, atol=3e-2, rtol=3e-2)
    strided = torch.randn(50, 3, 9)[..., 1:]  # odd offset: not viewable as complex pairs
    torch.testing.assert_close(rotate_into(strided, rope), rotate_into(strided.contiguous(), rope))
