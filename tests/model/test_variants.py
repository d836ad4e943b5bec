"""The ablation variants (trainer.model.variants): each trains, each has main's parameter count."""

from __future__ import annotations

import math

import pytest
import torch

from tests.model.support import N_SESSIONS, N_UNITS, batch_for, small
from trainer.model.network import n_parameters
from trainer.model.variants import VARIANTS, build_model, param_table


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_and_matches_main_parameter_count(variant):
    config = small(ffn_dropout=0.1, attn_dropout=0.1, residual_dropout=0.1)
    torch.manual_seed(0)
    model = build_model(variant, config, N_UNITS, N_SESSIONS).train()
    main = n_parameters(build_model("main", config, N_UNITS, N_SESSIONS), embeddings=False)
    assert abs(n_parameters(model, embeddings=False) / main - 1) <= 0.05
    batch = batch_for(queries_per_sample=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = model(batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses


def test_param_table_lists_every_variant_within_tolerance():
    rows = param_table(small(), N_UNITS, N_SESSIONS, printer=None)
    assert [r["variant"] for r in rows] == list(VARIANTS)
    assert all(abs(r["vs_main"]) <= 0.05 for r in rows)
