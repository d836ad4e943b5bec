"""Train/valid/test splits by time within each stimulus epoch (POYO+: 60/10/30, seeded).

Why blocks: POYO+ keeps the 60/10/30 ratio "across each stimulus epoch". We cut
every epoch (a run of presentations of one task, or a stretch with none) into
blocks of ``block_s`` seconds, give each split its exact share of blocks
(largest remainder), and shuffle which block goes where with a seed derived from
(seed, session). Splits then sample the whole epoch (slow drifts in state do not
all land in one split), yet no presentation is ever shared: block edges are moved
to presentation edges, and windows are later cut inside one split's intervals.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ingest.records import Intervals

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SplitConfig:
    fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    block_s: float = 10.0
    epoch_gap_s: float = 5.0  # presentations of one task further apart than this start a new epoch
    seed: int = 0


def _session_seed(seed: int, session_id: str, region: str) -> int:
    digest = hashlib.sha256(f"{seed}/{session_id}/{region}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def epochs(t_start: float, t_end: float, stimuli: list[Intervals], gap_s: float) -> list[tuple[float, float]]:
    """Partition [t_start, t_end) into stimulus epochs and the stretches between them."""
    spans = []
    for iv in stimuli:
        if len(iv.start) == 0:
            continue
        order = np.argsort(iv.start, kind="stable")
        s, e = iv.start[order], iv.end[order]
        breaks = np.nonzero(s[1:] - np.maximum.accumulate(e)[:-1] > gap_s)[0]
        firsts = np.r_[0, breaks + 1]
        lasts = np.r_[breaks, len(s) - 1]
        ends = np.maximum.accumulate(e)
        spans += [(float(s[a]), float(ends[b])) for a, b in zip(firsts, lasts)]
    spans = sorted((max(a, t_start), min(b, t_end)) for a, b in spans if b > t_start and a < t_end)
    merged: list[list[float]] = []
    for a, b in spans:  # overlapping epochs of different tasks merge into one
        if merged and a < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out, t = [], t_start
    for a, b in merged:
        if a > t:
            out.append((t, a))
        out.append((a, b))
        t = b
    if t < t_end:
        out.append((t, t_end))
    return [(a, b) for a, b in out if b > a]


def _shares(n: int, fractions: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    raw = np.asarray(fractions, dtype=np.float64) / sum(fractions) * n
    counts = np.floor(raw).astype(int)
    rem = raw - counts
    # largest remainder, ties broken by the seed
    order = np.lexsort((rng.random(len(rem)), -rem))
    counts[order[: n - counts.sum()]] += 1
    return counts


def _snap(t: float, starts: np.ndarray, ends: np.ndarray) -> float:
    """Move t out of any presentation it falls inside, to that presentation's nearer edge."""
    i = np.searchsorted(starts, t, side="right") - 1
    if i >= 0 and starts[i] < t < ends[i]:
        return float(starts[i] if t - starts[i] <= ends[i] - t else ends[i])
    return t


def assign_splits(
    session_id: str,
    region: str,
    t_start: float,
    t_end: float,
    stimuli: list[Intervals],
    config: SplitConfig = SplitConfig(),
) -> dict[str, list[tuple[float, float]]]:
    """Sorted, disjoint [a, b) intervals per split covering [t_start, t_end)."""
    rng = np.random.default_rng(_session_seed(config.seed, session_id, region))
    if stimuli:
        starts = np.concatenate([iv.start for iv in stimuli])
        ends = np.concatenate([iv.end for iv in stimuli])
        order = np.argsort(starts, kind="stable")
        starts, ends = starts[order], np.maximum.accumulate(ends[order])
    else:
        starts = ends = np.zeros(0)
    pieces: list[tuple[float, float, int]] = []
    for a, b in epochs(t_start, t_end, stimuli, config.epoch_gap_s):
        n = max(1, int(round((b - a) / config.block_s)))
        labels = np.repeat(np.arange(3), _shares(n, config.fractions, rng))
        rng.shuffle(labels)
        edges = [a] + [_snap(a + (b - a) * k / n, starts, ends) for k in range(1, n)] + [b]
        edges = np.maximum.accumulate(np.asarray(edges))
        pieces += [(float(edges[k]), float(edges[k + 1]), int(labels[k])) for k in range(n) if edges[k + 1] > edges[k]]
    out: dict[str, list[tuple[float, float]]] = {s: [] for s in SPLITS}
    for a, b, lab in pieces:
        runs = out[SPLITS[lab]]
        if runs and abs(runs[-1][1] - a) < 1e-12:
            runs[-1] = (runs[-1][0], b)
        else:
            runs.append((a, b))
    return out
