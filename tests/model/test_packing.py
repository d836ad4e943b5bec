"""Index arithmetic of packed batches (trainer.model.packing)."""

from __future__ import annotations

import torch

from trainer.model.packing import segment_ids


def test_segment_ids_name_each_row_s_sample_including_empty_samples():
    cu = torch.tensor([0, 3, 3, 4, 6], dtype=torch.int32)  # sample 1 has no rows
    assert segment_ids(cu).tolist() == [0, 0, 0, 2, 3, 3]
    assert torch.equal(segment_ids(cu, total=6), segment_ids(cu))
    assert segment_ids(torch.tensor([0, 0])).tolist() == []
