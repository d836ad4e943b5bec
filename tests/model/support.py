"""What the model tests share: the small preset, a model and a packed batch built from a seed, packing
and unpacking per sample, logits back in query order.

Everything runs the small preset on CPU with batches in the docs/batch.md layout
(``trainer.model.synthetic``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.model.config import ModelConfig
from trainer.model.network import MultiModalPOYO
from trainer.model.synthetic import synthetic_batch

N_UNITS, N_SESSIONS = 120, 12
MIXED = [0, 1, 1, 0, 1, 0]


def small(**kw) -> ModelConfig:
    return ModelConfig.small(**kw)


def model_for(config: ModelConfig, seed: int = 0) -> MultiModalPOYO:
    torch.manual_seed(seed)
    return MultiModalPOYO(config=config, n_units=N_UNITS, n_sessions=N_SESSIONS).eval()


def batch_for(modalities=MIXED, seed: int = 0, **kw):
    kw = {"units_per_sample": 10, "rois_per_sample": 5, "frame_hz": 10.0, "queries_per_sample": 3} | kw
    return synthetic_batch(modalities=modalities, n_units=N_UNITS, n_sessions=N_SESSIONS, seed=seed, **kw)


TOKEN_KEYS = ("input_unit_index", "input_timestamps", "input_values")
QUERY_KEYS = ("output_timestamps", "output_task_index", "output_labels", "output_weights")


def unpack(batch) -> list[dict]:
    """Packed batch -> one dict per sample."""
    cu_in, cu_out = batch["input_cu_seqlens"].tolist(), batch["output_cu_seqlens"].tolist()
    return [{**{k: batch[k][cu_in[i]:cu_in[i + 1]] for k in TOKEN_KEYS},
             **{k: batch[k][cu_out[i]:cu_out[i + 1]] for k in QUERY_KEYS},
             "modality": batch["modality"][i], "session_index": batch["session_index"][i]}
            for i in range(len(cu_in) - 1)]


def pack(samples: list[dict]):
    """One dict per sample -> packed batch (docs/batch.md)."""
    def cu(key):
        lens = torch.tensor([len(s[key]) for s in samples])
        return F.pad(lens.cumsum(0), (1, 0)).int()
    return {**{k: torch.cat([s[k] for s in samples]) for k in TOKEN_KEYS + QUERY_KEYS},
            "modality": torch.stack([s["modality"] for s in samples]),
            "session_index": torch.stack([s["session_index"] for s in samples]),
            "input_cu_seqlens": cu("input_unit_index"), "output_cu_seqlens": cu("output_timestamps"),
            "window_s": torch.tensor(1.0)}


def logits_by_query(model, batch) -> torch.Tensor:
    """All tasks' logits back in query order, padded to the widest head: (Q, max classes)."""
    out = model(batch)
    width = max(t.out_dim for t in model.config.tasks)
    full = torch.full((len(batch["output_timestamps"]), width), float("nan"))
    for name, rows in out["query_index"].items():
        full[rows.cpu(), :out["logits"][name].shape[1]] = out["logits"][name].detach().float().cpu()
    return full


def assert_close_nan(a, b, atol=1e-5):
    assert torch.equal(a.isnan(), b.isnan())
    torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=atol, rtol=max(1e-4, atol))


