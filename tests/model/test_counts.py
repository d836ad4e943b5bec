"""The count loss (trainer.model.counts): counts per (query, unit) from a packed batch, and what the loss trains."""

from __future__ import annotations

import pytest
import torch

from tests.model.support import N_SESSIONS, N_UNITS, model_for, small
from trainer.model.counts import count_nll, query_unit_counts
from trainer.model.packing import segment_ids
from trainer.model.synthetic import synthetic_batch


def brute_force(unit, time, cu, q_sample, lo, hi):
    """{(query, unit): count} over every unit with a token in the query's sample."""
    out = {}
    for q, s in enumerate(q_sample.tolist()):
        a, b = int(cu[s]), int(cu[s + 1])
        for u in set(unit[a:b].tolist()):
            out[(q, u)] = sum(1 for k in range(a, b) if int(unit[k]) == u and lo[q] <= time[k] < hi[q])
    return out


def as_dict(row_q, row_unit, counts, _sums=None):
    return {(int(q), int(u)): int(c) for q, u, c in zip(row_q, row_unit, counts)}


def test_counts_on_a_hand_made_batch():
    unit = torch.tensor([3, 5, 3, 7, 5, 5])
    time = torch.tensor([0.1, 0.2, 0.3, 0.9, 0.05, 0.5])
    cu = torch.tensor([0, 4, 6])
    q_sample = torch.tensor([0, 1, 0])
    lo, hi = torch.tensor([0.0, 0.4, 0.85]), torch.tensor([0.35, 0.6, 1.0])
    got = as_dict(*query_unit_counts(unit, time, cu, q_sample, lo, hi))
    assert got == {(0, 3): 2, (0, 5): 1, (0, 7): 0, (1, 5): 1, (2, 3): 0, (2, 5): 0, (2, 7): 1}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_equal_brute_force_on_random_packed_batches(seed):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(0, 30, (5,), generator=g)
    cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0))
    unit = torch.randint(0, 12, (int(cu[-1]),), generator=g)
    time = torch.rand(int(cu[-1]), generator=g)
    q_sample = torch.randint(0, 5, (9,), generator=g)
    lo = torch.rand(9, generator=g) * 0.7
    hi = lo + 0.3
    got = as_dict(*query_unit_counts(unit, time, cu, q_sample, lo, hi))
    assert got == brute_force(unit, time, cu, q_sample, lo.tolist(), hi.tolist())


def test_the_count_loss_trains_the_rows_of_ephys_units_only():
    """With count_loss > 0 the model's loss adds count_loss x the count term, whose gradient reaches exactly the
    rows of the units of EPhys samples; off, the model has no count head (earlier checkpoints load as before)."""
    assert model_for(small()).count_head is None
    model = model_for(small(count_loss=0.5))
    batch = synthetic_batch(modalities=[0, 0, 1], n_units=N_UNITS, n_sessions=N_SESSIONS, queries_per_sample=3,
                            config=model.config, seed=0)
    batch["output_timestamps"] = torch.full_like(batch["output_timestamps"], 0.5)  # every span inside the window
    out = model(batch)
    assert out["count_nll"] > 0
    q_sample = segment_ids(batch["output_cu_seqlens"].long())
    nll = count_nll(model.count_head, model.unit_rows, batch, q_sample, latency=0.05, span=0.25, window_s=1.0)
    assert torch.isclose(nll.detach(), out["count_nll"])
    model.zero_grad()
    nll.backward()
    touched = set(model.unit_emb.weight.grad.abs().sum(1).nonzero().squeeze(1).tolist())
    cu = batch["input_cu_seqlens"]
    assert touched == set(batch["input_unit_index"][: int(cu[2])].tolist())  # the two EPhys samples' units
