"""An epoch as data: which window every (rank, worker, batch) gets, as a pure function.

Inputs: the chunk table (``chunks.parquet``), the mixture, the seed and epoch, the
window length and epoch size, and the world shape. Output: arrays, not iterator
state, so resuming is "skip the first k windows of the global order" on any world
size or worker count (MosaicML streaming's idea), and every rank gets the same
number of batches because the shape says so.

Training epoch (``split="train"``):
1. Each selector's chunks give slots: one per whole window a chunk holds (at least one).
2. Chunks are put in a random order (per epoch and seed) and each chunk's slots are
   spread by a jitter sort of span ``shuffle_window`` (a sample buffer as a pure
   function). Chunks are read by byte range, so there is no need to walk shards in
   order: the shard order is shuffled at chunk granularity (docs/stream.md).
3. A selector needing more windows than it has slots repeats re-shuffled passes;
   one needing fewer takes the first ones (subsample). Quotas are exact.
4. Selectors are interleaved by largest deficit (``mixture.interleave``).
5. Each window's start is uniform in its chunk (a pure function of seed, epoch, position).
6. Global order -> steps of ``world_size * batch_size`` windows; rank r takes the r-th
   ``batch_size`` of each step; the tail that does not fill a step is dropped (``rank_positions``
   and ``n_batches``: the one place the stream, its loader and ``shards mix`` get this from).

Evaluation (``valid``/``test``, or ``train`` to score a model on exactly the chunks it trained
on): overlapping windows slide over each chunk from its start every ``eval_stride_s`` (default
half a window, as torch_brain's stitching evaluation sampler), plus one window ending at the
chunk's end when the slide stops short of it, so
every presentation of the chunk is queried by at least one window and none crosses a chunk
edge; chunks in order, no mixture weighting. The last step is padded with repeats flagged
``pad=True`` so ranks stay equal and no window is counted twice. Evaluation merges the
windows that query one presentation (``trainer.tally``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from shards.stream.mixture import Selector, assign, interleave


def epoch_rng(seed: int, epoch: int, *key: object) -> np.random.Generator:
    """The generator of one random choice of one epoch, e.g. ``epoch_rng(seed, epoch, "dropout", position)``.

    Seeded by a hash of its whole key, not drawn from a shared generator, so that any process (a rank,
    a DataLoader worker, a resumed run) draws the same numbers for the same key in any order, and a
    new kind of draw (a new key) changes none of the existing ones."""
    digest = hashlib.sha256("/".join(map(str, (seed, epoch, *key))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def n_batches(n_windows: int, world_size: int, batch_size: int, start_window: int = 0) -> int:
    """Batches every rank gets from an epoch of ``n_windows`` windows, from global window
    ``start_window`` on: whole steps of ``world_size * batch_size`` windows; the tail that does not
    fill a step is dropped, so all ranks have the same number."""
    return max(0, (n_windows - start_window) // (world_size * batch_size))


def rank_positions(n_windows: int, rank: int, world_size: int, batch_size: int, start_window: int = 0) -> np.ndarray:
    """(batches, batch_size) positions in the global order of one rank's batches: step k covers the
    windows from ``start_window + k * world_size * batch_size`` on, and rank r takes the r-th
    ``batch_size`` of each step.

    ``start_window`` is the number of global windows already consumed (a resume) and need not be a
    multiple of the step: a run resumed on another world size or batch size continues the same
    global order from there (elastic resume)."""
    if not 0 <= rank < world_size or batch_size < 1 or start_window < 0:
        raise ValueError(f"rank {rank} of world size {world_size}, batch size {batch_size}, start window "
                         f"{start_window}: need 0 <= rank < world size, batch size >= 1, start window >= 0")
    step = world_size * batch_size
    steps = start_window + np.arange(n_batches(n_windows, world_size, batch_size, start_window))[:, None] * step
    return steps + rank * batch_size + np.arange(batch_size)[None, :]


@dataclass(frozen=True)
class PlanConfig:
    window_s: float = 1.0
    epoch_windows: int | None = None  # None: the natural size (one window per whole window of train data)
    shuffle_window: int = 256  # span of the local shuffle, in slots
    seed: int = 0
    sessions_include: tuple[str, ...] = ()
    sessions_exclude: tuple[str, ...] = ()  # e.g. held-out sessions for transfer
    eval_stride_s: float | None = None  # evaluation windows start this far apart (None: window_s / 2)
    train_fraction: float = 1.0  # train on this share of each record's train chunks (``train_subset``)


@dataclass
class Plan:
    """Global order of one epoch. ``chunk`` indexes the chunk table the plan was made from."""

    chunk: np.ndarray  # int64 (N,)
    t0: np.ndarray  # float64 (N,) window start, seconds in the file clock
    selector: np.ndarray  # int64 (N,) -1 for evaluation windows
    pad: np.ndarray  # bool (N,) padding windows (evaluation only): do not score
    selectors: list[Selector] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chunk)


def filter_sessions(chunks: pd.DataFrame, config: PlanConfig) -> np.ndarray:
    keep = np.ones(len(chunks), dtype=bool)
    if config.sessions_include:
        keep &= chunks.session_id.isin(config.sessions_include).to_numpy()
    if config.sessions_exclude:
        keep &= ~chunks.session_id.isin(config.sessions_exclude).to_numpy()
    return keep


def train_subset(chunks: pd.DataFrame, usable: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``usable`` narrowed to ``fraction`` of each record's (session x region) usable train chunks, at least one.

    For data-efficiency curves (how a pretrained model and one trained from scratch fare with less of a new
    session's data; the papers' finetuning-data axis). The chunks are drawn at random, not the earliest ones:
    a record's train split is whole stimulus blocks, so its first quarter may hold one task only. The draw
    depends on the seed and the record alone, never the epoch, so every epoch, rank and resume sees the
    same subset, and a smaller fraction's chunks are a subset of a larger one's (the same permutation)."""
    if fraction >= 1.0:
        return usable
    keep = np.zeros(len(chunks), dtype=bool)
    rows = np.nonzero(usable)[0]
    records = chunks.session_id.to_numpy()[rows].astype(str) + "/" + chunks.region.to_numpy()[rows].astype(str)
    for record in sorted(set(records)):
        mine = rows[records == record]
        order = epoch_rng(seed, 0, "train_subset", record).permutation(len(mine))
        keep[mine[order[:max(1, int(round(fraction * len(mine))))]]] = True
    return keep


def _slots(rows: np.ndarray, chunks: pd.DataFrame, window_s: float, shuffle_window: int,
           rng: np.random.Generator) -> np.ndarray:
    """Chunk row per slot: chunks in a random order, each repeated once per whole window it holds,
    then a jitter sort of span ``shuffle_window`` spreads a chunk's windows over that many positions
    (so a decoded chunk is reused while it is in the worker's cache, yet neighbours are unrelated)."""
    sub = chunks.iloc[rows]
    n_slots = np.maximum(1, np.floor((sub.t_end - sub.t_start).to_numpy() / window_s + 1e-9).astype(np.int64))
    order = rng.permutation(len(rows))
    slot_rows = np.repeat(rows[order], n_slots[order])
    jitter = np.arange(len(slot_rows)) + rng.random(len(slot_rows)) * shuffle_window
    return slot_rows[np.argsort(jitter, kind="stable")]


def train_chunks(chunks: pd.DataFrame, config: PlanConfig) -> np.ndarray:
    """Which chunks training draws windows from: the train split of the sessions asked for, each chunk holding
    a whole window, narrowed to ``config.train_fraction`` (anything else that fits on the training data, such
    as ``trainer.unit_init``, reads exactly these)."""
    train = (chunks.split == "train").to_numpy() & filter_sessions(chunks, config)
    fits = ((chunks.t_end - chunks.t_start).to_numpy() >= config.window_s - 1e-9)
    return train_subset(chunks, train & fits, config.train_fraction, config.seed)


def plan_train_epoch(chunks: pd.DataFrame, selectors: list[Selector], epoch: int, config: PlanConfig) -> Plan:
    usable = train_chunks(chunks, config)
    owner = np.full(len(chunks), -1, dtype=np.int64)
    owner[usable] = assign(selectors, chunks.modality.to_numpy()[usable], chunks.region.to_numpy()[usable],
                           chunks.session_id.to_numpy()[usable])
    weights = np.array([s.weight for s in selectors])
    per_sel_slots = [_slots(np.nonzero(owner == i)[0], chunks, config.window_s, config.shuffle_window,
                            epoch_rng(config.seed, epoch, "slots", s.name)) for i, s in enumerate(selectors)]
    n = config.epoch_windows or int(sum(len(s) for s in per_sel_slots))
    seq = interleave(weights, n, seed=config.seed * 1_000_003 + epoch)
    chunk_idx = np.empty(n, dtype=np.int64)
    for i, s in enumerate(selectors):
        slots = per_sel_slots[i]
        need = int((seq == i).sum())
        passes = [slots]
        p = 1
        while sum(len(x) for x in passes) < need:  # small stream: re-shuffled repeats
            passes.append(_slots(np.unique(slots), chunks, config.window_s, config.shuffle_window,
                                 epoch_rng(config.seed, epoch, "repeat", p, s.name)))
            p += 1
        chunk_idx[seq == i] = np.concatenate(passes)[:need]  # large stream: subsample
    span = (chunks.t_end - chunks.t_start).to_numpy()[chunk_idx] - config.window_s
    u = epoch_rng(config.seed, epoch, "offsets").random(n)
    t0 = chunks.t_start.to_numpy()[chunk_idx] + np.clip(span, 0, None) * u
    return Plan(chunk_idx, t0, seq, np.zeros(n, dtype=bool), selectors)


def eval_stride(config: PlanConfig) -> float:
    stride = config.window_s / 2 if config.eval_stride_s is None else float(config.eval_stride_s)
    if not 0 < stride <= config.window_s + 1e-12:
        raise ValueError(f"eval_stride_s must be in (0, window_s={config.window_s}], got {stride}")
    return stride


def plan_eval(chunks: pd.DataFrame, split: str, config: PlanConfig, world_size: int = 1,
              batch_size: int = 1) -> Plan:
    """Overlapping windows of a split (``eval_stride_s`` apart, the last one flush with the chunk's
    end), padded to whole steps. Chunks shorter than a window give none."""
    w, stride = config.window_s, eval_stride(config)
    if split == "train":  # scoring what a run trained on: exactly its chunks (train_fraction included)
        rows = np.nonzero(train_chunks(chunks, config))[0]
    else:
        rows = np.nonzero((chunks.split == split).to_numpy() & filter_sessions(chunks, config))[0]
    a = chunks.t_start.to_numpy()[rows]
    b = chunks.t_end.to_numpy()[rows]
    fits = b - a >= w - 1e-9
    rows, a, b = rows[fits], a[fits], b[fits]
    n_slide = np.floor((b - a - w) / stride + 1e-9).astype(np.int64) + 1
    tail = b - (a + (n_slide - 1) * stride + w) > 1e-9  # the slide stops short of the end: one flush window
    n_win = n_slide + tail
    chunk_idx = np.repeat(rows, n_win)
    k = np.arange(len(chunk_idx)) - np.repeat(np.cumsum(n_win) - n_win, n_win)
    t0 = np.minimum(np.repeat(a, n_win) + k * stride, np.repeat(b, n_win) - w)  # the flush one: k = n_slide
    step = world_size * batch_size
    n_pad = (-len(chunk_idx)) % step
    pad = np.zeros(len(chunk_idx) + n_pad, dtype=bool)
    pad[len(chunk_idx):] = True
    if n_pad:
        reps = np.arange(n_pad) % max(1, len(chunk_idx))
        chunk_idx = np.concatenate([chunk_idx, chunk_idx[reps]])
        t0 = np.concatenate([t0, t0[reps]])
    return Plan(chunk_idx, t0, np.full(len(chunk_idx), -1, dtype=np.int64), pad, [])
