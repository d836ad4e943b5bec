"""The streaming dataset: planned mixture windows -> packed batches, local or s3://.

``MixtureStream`` is a torch ``IterableDataset`` whose items are whole packed
batches (docs/batch.md): DataLoader workers hand over groups of contiguous batches
(``shards.stream.wire``), never single samples. What each (rank, worker, batch) reads
comes from the epoch plan (``shards.stream.plan``); a worker only fetches, decodes,
cuts and packs.

``shards.stream.loader.StreamLoader`` wraps the DataLoader and owns the resumable state.

Corrupt samples are bad bytes only: a checksum (``xxh3`` in chunks.parquet, ``shards.stream.integrity``)
that differs, a sample that does not decode, a shard that ends before the sample. They are
skipped (lenient, counted in the batch's ``n_skipped`` and against ``error_budget``, checked at
every skipped sample) or raise ``CorruptSampleError`` naming the shard (``strict``). A store that
cannot be reached (``shards.stream.fetch.StoreUnavailable``, after the fetcher's retry policy) or an
object that is missing or denied (``FetchError``) is not corruption: it stops the stream at once.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shards import manifest
from shards.store import Store
from shards.stream import integrity
from shards.stream.fetch import ChunkFetcher, FetchError, TruncatedShard
from shards.stream.mixture import Selector, assign, parse_mix
from shards.stream.plan import (
    Plan,
    PlanConfig,
    epoch_rng,
    eval_stride,
    n_batches,
    plan_eval,
    plan_train_epoch,
    rank_positions,
)
from shards.stream.tokens import DecodedChunk, TokenConfig, Vocab, pack, window_tokens
from shards.stream.wire import to_wire, transfer_groups

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    store: str
    mix: str = "ephys=1,ophys=1"
    split: str = "train"
    batch_size: int = 32
    window_s: float = 1.0
    seed: int = 0
    epoch_windows: int | None = None
    shuffle_window: int = 256
    eval_stride_s: float | None = None  # valid/test windows start this far apart (None: window_s / 2)
    unit_dropout: bool | None = None  # None: on for train, off otherwise
    sessions_include: tuple[str, ...] = ()
    sessions_exclude: tuple[str, ...] = ()
    strict: bool = False  # raise on a corrupt sample instead of skipping it
    error_budget: float = 0.01  # lenient mode: fraction of an epoch's windows that may be skipped
    decoded_cache: int = 128  # decoded chunks kept per worker
    cache_bytes: int = 1 << 30  # S3 byte-range cache per worker
    fetch_threads: int = 8
    prefetch_batches: int = 4
    batches_per_transfer: int = 8  # DataLoader workers hand over this many batches per item
    check_shards: bool = True  # verify every planned shard exists before training starts
    check_checksums: bool = True  # check each sample's xxh3 (chunks.parquet) before decoding it
    calcium_lag_s: float = 0.0  # OPhys windows read their frames this much later (shards.stream.tokens)
    calcium_bin: int = 1  # OPhys frames averaged per token (shards.stream.tokens)
    calcium_noise: float = 0.0  # training: Gaussian noise (dF/F sd) on calcium tokens, fresh every window it is read
    train_fraction: float = 1.0  # this share of each record's train chunks (shards.stream.plan.train_subset)
    # read the train split as valid and test are read (overlapping windows, every presentation, no dropout), so a
    # model can be scored on what it trained on: training and held-out accuracy side by side tell under- from
    # over-fitting (trainer.score)
    score_train: bool = False

    @property
    def training(self) -> bool:
        """Whether this stream plans training epochs (the train split, not scored)."""
        return self.split == "train" and not self.score_train

    def plan_config(self) -> PlanConfig:
        return PlanConfig(window_s=self.window_s, epoch_windows=self.epoch_windows, shuffle_window=self.shuffle_window,
                          seed=self.seed, sessions_include=tuple(self.sessions_include),
                          sessions_exclude=tuple(self.sessions_exclude), eval_stride_s=self.eval_stride_s,
                          train_fraction=self.train_fraction)


class CorruptSampleError(RuntimeError):
    pass


def error_budget(config: StreamConfig, n_epoch: int) -> int:
    """Corrupt samples an epoch of ``n_epoch`` windows may skip (lenient mode)."""
    return math.ceil(config.error_budget * n_epoch)


def over_budget(config: StreamConfig, skipped: int, n_epoch: int) -> CorruptSampleError:
    return CorruptSampleError(f"{skipped} corrupt samples skipped this epoch, over the error budget of "
                              f"{error_budget(config, n_epoch)} ({config.error_budget:.1%} of {n_epoch} windows)")


class MixtureStream(IterableDataset):
    """Packed batches of one rank's share of an epoch; see module docstring."""

    def __init__(self, config: StreamConfig, *, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.store = Store(config.store)
        tables = manifest.load(self.store)
        self.chunks: pd.DataFrame = tables.chunks.to_pandas()
        # plain arrays for the per-window hot path (pandas row access costs ~50 us)
        self._paths = self.chunks.path.to_numpy()
        self._keys = self.chunks.key.to_numpy()
        self._offsets = self.chunks.offset.to_numpy()
        self._lengths = self.chunks.length.to_numpy()
        self._checksums = self._checksum_column(tables.chunks)
        self.vocab = Vocab.from_tables(tables.units.to_pandas(), tables.sessions.to_pandas())
        self.selectors: list[Selector] = parse_mix(config.mix) if config.training else []
        self._validate(tables.manifest.to_pandas())
        self.epoch = 0
        self.start_window = 0
        self.start_skipped = 0  # corrupt samples the epoch had skipped before start_window (StreamLoader)
        self.skipped = 0  # corrupt samples skipped this epoch, as this process counts them
        self._fetcher = None

    def _checksum_column(self, chunks) -> np.ndarray | None:
        """Each row's expected xxh3 ("" where the store has none), or None when nothing is checked."""
        if not self.config.check_checksums:
            return None
        where = self.store.url(manifest.CHUNKS)
        if integrity.COLUMN not in chunks.column_names:
            log.warning("%s has no %s column (written before per-sample checksums): its samples are read "
                        "unchecked; ingest into a new store to add them", where, integrity.COLUMN)
            return None
        col = chunks.column(integrity.COLUMN)
        if col.null_count:
            log.warning("%s: %d of %d samples have no %s checksum (ingested before checksums): those are read "
                        "unchecked", where, col.null_count, len(col), integrity.COLUMN)
        return np.array(col.fill_null("").to_pylist(), dtype=object)

    @classmethod
    def for_this_rank(cls, config: StreamConfig) -> MixtureStream:
        """The stream of this process's rank: torch.distributed when initialised (Ray Train sets it up),
        else a single rank."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(config, rank=dist.get_rank(), world_size=dist.get_world_size())
        return cls(config)

    # ---- checks before any training starts ---------------------------------------------------------
    def _validate(self, shards: pd.DataFrame) -> None:
        c = self.chunks
        if not len(c):
            raise ValueError(f"{self.store.uri}: the store holds no samples")
        if self.config.training:
            train = c[c.split == "train"]
            assign(self.selectors, train.modality.to_numpy(), train.region.to_numpy(), train.session_id.to_numpy())
        eval_stride(self.config.plan_config())  # a bad --eval-stride-s fails here, before any worker starts
        for sid in (*self.config.sessions_include, *self.config.sessions_exclude):
            if sid not in self.vocab.sessions:
                raise ValueError(f"session {sid!r} is not in {self.store.url('sessions.parquet')}")
        if self.config.check_shards:
            # one recursive listing (a LIST per 1,000 keys on S3) instead of a HEAD per shard
            present = set(self.store.list("", ".tar"))
            missing = [p for p in sorted(set(shards.path)) if p not in present]
            if missing:
                raise FileNotFoundError(f"shard listed in the manifest but absent: {self.store.url(missing[0])}"
                                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    # ---- the plan ----------------------------------------------------------------------------------
    def plan(self, epoch: int | None = None) -> Plan:
        epoch = self.epoch if epoch is None else epoch
        cfg = self.config.plan_config()
        if self.config.training:
            return plan_train_epoch(self.chunks, self.selectors, epoch, cfg)
        return plan_eval(self.chunks, self.config.split, cfg, self.world_size, self.config.batch_size)

    def batches_per_rank(self, epoch: int | None = None, start_window: int = 0) -> int:
        return n_batches(len(self.plan(epoch)), self.world_size, self.config.batch_size, start_window)

    def positions(self, plan: Plan, start_window: int) -> np.ndarray:
        """(batches, batch_size) global positions of this rank, from a global window offset."""
        return rank_positions(len(plan), self.rank, self.world_size, self.config.batch_size, start_window)

    def budget(self, n_epoch: int) -> int:
        """Corrupt samples an epoch of ``n_epoch`` windows may skip (``error_budget``, looked up at each
        call, so a test that lifts the budget lifts it for the loader too)."""
        return error_budget(self.config, n_epoch)

    # ---- reading -----------------------------------------------------------------------------------
    def _get_fetcher(self) -> ChunkFetcher:
        if self._fetcher is None:  # created in the process that reads (a DataLoader worker), never forked
            self._fetcher = ChunkFetcher(self.store, cache_bytes=self.config.cache_bytes,
                                         threads=self.config.fetch_threads)
        return self._fetcher

    def _decode(self, row: int, cache: OrderedDict) -> DecodedChunk:
        """The decoded chunk of ``row``; CorruptSampleError for bad bytes (remembered in ``cache``
        like a decoded chunk, so a bad chunk is not fetched again for each of its windows). Fetch
        errors that are not about the bytes (StoreUnavailable, a missing object) pass through."""
        hit = cache.get(row)
        if hit is not None:
            cache.move_to_end(row)
            if isinstance(hit, CorruptSampleError):
                raise hit
            return hit
        path, key, offset = self._paths[row], self._keys[row], int(self._offsets[row])
        try:
            data = self._get_fetcher().get(path, offset, int(self._lengths[row]))
            expected = self._checksums[row] if self._checksums is not None else None
            chunk = integrity.decode_chunk(data, key, self.vocab, expected)
        except FetchError as exc:
            if not isinstance(exc, TruncatedShard):
                raise
            chunk = CorruptSampleError(f"bytes {offset}+{int(self._lengths[row])}: {exc}")
        except Exception as exc:  # bad bytes, whatever the decoder tripped on
            chunk = CorruptSampleError(f"bytes {offset}+{int(self._lengths[row])}: {type(exc).__name__}: {exc}")
        cache[row] = chunk
        if len(cache) > self.config.decoded_cache:
            cache.popitem(last=False)
        if isinstance(chunk, CorruptSampleError):
            raise chunk
        return chunk

    def _prefetch(self, plan: Plan, positions: np.ndarray) -> None:
        rows = np.unique(plan.chunk[positions.reshape(-1)])
        self._get_fetcher().prefetch(zip(self._paths[rows], self._offsets[rows], self._lengths[rows]))

    def make_batch(self, plan: Plan, pos: np.ndarray, epoch: int, cache: OrderedDict) -> dict:
        train = self.config.training
        dropout = train if self.config.unit_dropout is None else self.config.unit_dropout
        noise = self.config.calcium_noise if train else 0.0
        tcfg = TokenConfig(window_s=self.config.window_s, unit_dropout=dropout,
                           calcium_lag_s=self.config.calcium_lag_s, calcium_bin=self.config.calcium_bin,
                           calcium_noise=noise)
        windows, modality, session, record, pads, skipped = [], [], [], [], [], 0
        for p in pos:
            row = int(plan.chunk[p])
            try:
                c = self._decode(row, cache)
            except CorruptSampleError as exc:  # bad bytes: skip the sample (lenient) or stop (strict)
                key, where = self._keys[row], self.store.url(self._paths[row])
                if self.config.strict:
                    raise CorruptSampleError(f"corrupt sample {key} in {where}: {exc}") from None
                if not getattr(exc, "reported", False):  # once per bad chunk, not once per window of it
                    exc.reported = True
                    log.warning("skipping corrupt sample %s in %s: %s", key, where, exc)
                skipped += 1
                self.skipped += 1
                if self.skipped > self.budget(len(plan)):  # checked per sample, not per batch
                    raise over_budget(self.config, self.skipped, len(plan)) from None
                continue
            rng = epoch_rng(self.config.seed, epoch, "dropout", int(p)) if dropout or noise else None
            windows.append(window_tokens(c, float(plan.t0[p]), tcfg, rng))
            modality.append(c.modality)
            session.append(c.session)
            record.append(c.record)
            pads.append(bool(plan.pad[p]))
        if not windows:
            raise CorruptSampleError(f"every sample of batch at position {int(pos[0])} is corrupt")
        arrays = pack(windows, modality, session, self.config.window_s, pads, record, self.config.calcium_lag_s,
                      self.config.calcium_bin)
        arrays["position"] = np.int64(pos[0])
        arrays["n_skipped"] = np.int64(skipped)
        return arrays

    def __iter__(self):
        """In-process: one batch (dict of tensors) at a time. In a DataLoader worker: groups of
        ``batches_per_transfer`` consecutive batches in one buffer (``to_wire``), because handing an
        item to the main process costs about a millisecond whatever its size."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, plan = self.epoch, self.plan()
        pos = self.positions(plan, self.start_window)
        k = self.config.batches_per_transfer if info is not None else 1
        groups = transfer_groups(len(pos), k, nw)[wid::nw]
        mine = [i for grp in groups for i in grp]
        cache: OrderedDict = OrderedDict()
        ahead = max(1, self.config.prefetch_batches)
        self.skipped = self.start_skipped
        try:
            if mine:
                self._prefetch(plan, pos[mine[:ahead]])
            done = 0
            for grp in groups:
                batches = []
                for i in grp:
                    if done + ahead < len(mine):
                        self._prefetch(plan, pos[mine[done + ahead]][None])
                    batches.append(self.make_batch(plan, pos[i], epoch, cache))
                    done += 1
                if info is None:
                    yield {key: torch.from_numpy(np.asarray(v)) for key, v in batches[0].items()}
                else:
                    yield to_wire(batches)
        finally:
            if self._fetcher is not None and info is not None:
                self._fetcher.close()
                self._fetcher = None

    def __getstate__(self):  # workers get config and tables, never a live fetcher (threads do not fork)
        state = self.__dict__.copy()
        state["_fetcher"] = None
        return state

