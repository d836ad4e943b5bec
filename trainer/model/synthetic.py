"""Fake packed batches in the docs/batch.md layout, for tests, benchmarks and demos (no store needed).

Numpy draws from one seeded generator, so the same arguments give the same batch bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from trainer.model.config import ModelConfig


def synthetic_batch(*, modalities: Sequence[int], n_units: int, n_sessions: int, config: ModelConfig | None = None,
                    units_per_sample: int = 8, spike_rate_hz: float = 20.0, rois_per_sample: int = 6,
                    frame_hz: float = 30.0, queries_per_sample: int = 2, window_s: float = 1.0,
                    seed: int = 0) -> dict[str, Tensor]:
    """A packed batch in the docs/batch.md layout (for tests, benchmarks and demos).

    Sample i is EPhys (Poisson spikes of ``units_per_sample`` units) or OPhys (``rois_per_sample`` x
    frames calcium tokens) per ``modalities[i]``; its units are distinct rows of the vocabulary, its
    session a random one; it asks ``queries_per_sample`` random (task, label) queries.
    """
    tasks = (config or ModelConfig.small()).tasks
    rng = np.random.default_rng(seed)
    unit_idx, times, values, lens, members = [], [], [], [], []
    for mod in modalities:
        units = rng.choice(n_units, size=min(n_units, units_per_sample if mod == 0 else rois_per_sample), replace=False)
        if mod == 0:
            counts = rng.poisson(spike_rate_hz * window_s, size=len(units))
            u = np.repeat(units, counts)
            t = rng.uniform(0, window_s, size=len(u))
            v = np.zeros(len(u))
        else:
            frames = np.arange(0, window_s, 1 / frame_hz)
            u = np.tile(units, len(frames))
            t = np.repeat(frames, len(units))
            v = rng.gamma(1.0, 0.3, size=len(u))
        members.append(np.sort(units))
        order = np.argsort(t, kind="stable")
        unit_idx.append(u[order]), times.append(t[order]), values.append(v[order]), lens.append(len(u))
    n = len(modalities)
    q = np.full(n, queries_per_sample)
    task = rng.integers(len(tasks), size=q.sum())
    classes = np.array([t.out_dim for t in tasks])
    cu = lambda x: torch.from_numpy(np.concatenate([[0], np.cumsum(x)]).astype(np.int32))  # noqa: E731
    return {
        "input_unit_index": torch.from_numpy(np.concatenate(unit_idx).astype(np.int64)),
        "input_timestamps": torch.from_numpy(np.concatenate(times).astype(np.float32)),
        "input_values": torch.from_numpy(np.concatenate(values).astype(np.float32)),
        "input_cu_seqlens": cu(lens),
        "modality": torch.tensor(list(modalities), dtype=torch.int64),
        "session_index": torch.from_numpy(rng.integers(n_sessions, size=n).astype(np.int64)),
        "output_timestamps": torch.from_numpy(rng.uniform(0, window_s, size=q.sum()).astype(np.float32)),
        "output_span": torch.full((int(q.sum()),), 0.25, dtype=torch.float32),
        "output_task_index": torch.from_numpy(task.astype(np.int64)),
        "output_labels": torch.from_numpy((rng.random(q.sum()) * classes[task]).astype(np.int64)),
        "output_weights": torch.ones(int(q.sum()), dtype=torch.float32),
        "output_cu_seqlens": cu(q),
        "sample_unit_index": torch.from_numpy(np.concatenate(members).astype(np.int64)),
        "sample_unit_cu_seqlens": cu([len(m) for m in members]),
        "window_s": torch.tensor(window_s, dtype=torch.float32),
    }
