"""The streaming dataset: planned mixture windows -> packed batches, local or s3://.

``MixtureStream`` is a torch ``IterableDataset`` whose items are whole packed
batches (docs/batch.md): DataLoader workers hand over one contiguous batch at a
time, never single samples. What each (rank, worker, batch) reads comes from the
epoch plan (``shards.stream.plan``); a worker only fetches, decodes, cuts and packs.

``StreamLoader`` wraps the DataLoader and owns the resumable state: the epoch and
the number of global windows consumed (by batches the training loop actually
received), plus the corrupt-sample count. Resuming on another world size or
worker count continues the same global order.

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
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import manifest
from shards.stream import integrity
from shards.stream.fetch import FetchError, StoreUnavailable, TruncatedShard
from shards.stream.mixture import Selector, assign, parse_mix
from shards.stream.plan import Plan, PlanConfig, _rng, eval_stride, plan_eval, plan_train_epoch
from shards.store import Store
from shards.stream.tokens import DecodedChunk, TokenConfig, Vocab, pack, window_tokens

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

    def plan_config(self) -> PlanConfig:
        return PlanConfig(window_s=self.window_s, epoch_windows=self.epoch_windows, shuffle_window=self.shuffle_window,
                          seed=self.seed, sessions_include=tuple(self.sessions_include),
                          sessions_exclude=tuple(self.sessions_exclude), eval_stride_s=self.eval_stride_s)


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
        self.selectors: list[Selector] = parse_mix(config.mix) if config.split == "train" else []
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
    def for_this_rank(cls, config: StreamConfig) -> "MixtureStream":
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
        if self.config.split == "train":
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
        if self.config.split == "train":
            return plan_train_epoch(self.chunks, self.selectors, epoch, cfg)
        return plan_eval(self.chunks, self.config.split, cfg, self.world_size, self.config.batch_size)

    def batches_per_rank(self, epoch: int | None = None, start_window: int = 0) -> int:
        return max(0, (len(self.plan(epoch)) - start_window) // (self.world_size * self.config.batch_size))

    def positions(self, plan: Plan, start_window: int) -> np.ndarray:
        """(batches, batch_size) global positions of this rank, from a global window offset."""
        b, w = self.config.batch_size, self.world_size
        n_steps = max(0, (len(plan) - start_window) // (w * b))
        steps = start_window + np.arange(n_steps)[:, None] * (w * b)
        return steps + self.rank * b + np.arange(b)[None, :]

    # ---- reading -----------------------------------------------------------------------------------
    def _get_fetcher(self):
        if self._fetcher is None:
            from shards.stream.fetch import ChunkFetcher

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
        train = self.config.split == "train"
        dropout = train if self.config.unit_dropout is None else self.config.unit_dropout
        tcfg = TokenConfig(window_s=self.config.window_s, unit_dropout=dropout)
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
                if self.skipped > error_budget(self.config, len(plan)):  # checked per sample, not per batch
                    raise over_budget(self.config, self.skipped, len(plan)) from None
                continue
            rng = _rng(self.config.seed, epoch, "dropout", int(p)) if dropout else None
            windows.append(window_tokens(c, float(plan.t0[p]), tcfg, rng))
            modality.append(c.modality)
            session.append(c.session)
            record.append(c.record)
            pads.append(bool(plan.pad[p]))
        if not windows:
            raise CorruptSampleError(f"every sample of batch at position {int(pos[0])} is corrupt")
        arrays = pack(windows, modality, session, self.config.window_s, pads, record)
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


def transfer_groups(n: int, k: int, n_workers: int) -> list[range]:
    """Consecutive batch ranges handed over as one item each; group i goes to worker i % n_workers,
    and the DataLoader reads workers round-robin, so items arrive in batch order whatever the sizes.

    Sizes ramp up 1, 2, 4, ... to k (one group of each size per worker): a group is delivered only
    when all its batches are built, so starting with k would make the first batch wait for k
    batches' worth of reads (256 windows from S3 at k=8, batch 32)."""
    out, start, size = [], 0, 1
    while start < n:
        for _ in range(n_workers):
            if start >= n:
                break
            out.append(range(start, min(start + size, n)))
            start += size
        size = min(2 * size, k)
    return out


def to_wire(batches: list[dict[str, np.ndarray]]) -> dict:
    """Several batches' arrays in one contiguous uint8 tensor plus a small layout.

    A DataLoader worker hands each tensor over through its own shared-memory file, and each
    item through a pickled message: one buffer per group of batches pays that once. The layout
    holds ``(batch, key, dtype, shape, offset in elements of dtype)``, with every array 8-byte
    aligned, so the receiver cuts each array from one typed view of the buffer."""
    layout, offset, parts = [], 0, []
    for i, arrays in enumerate(batches):
        for key, v in arrays.items():
            v = np.asarray(v)
            if not v.flags.c_contiguous:
                v = v.copy()  # (not ascontiguousarray: it turns 0-d scalars into shape (1,))
            offset = -(-offset // 8) * 8  # 8-byte aligned, so every dtype views in place
            layout.append((i, key, v.dtype.str, v.shape, offset // v.dtype.itemsize))
            parts.append((offset, v))
            offset += v.nbytes
    offset = -(-offset // 8) * 8
    # (a buffer allocated in shared memory up front saves the copy the hand-over makes, yet
    # measured slower with 2 workers on 2 cores: fresh shared pages fault on every item)
    wire = torch.empty(offset, dtype=torch.uint8)
    buf = wire.numpy()
    for off, v in parts:
        buf[off:off + v.nbytes] = v.reshape(-1).view(np.uint8)
    return {"wire": wire, "layout": layout, "n": len(batches)}


_TORCH_DTYPES = {np.dtype(t).str: getattr(torch, np.dtype(t).name)
                 for t in ("int8", "uint8", "int16", "int32", "int64", "float16", "float32", "float64", "bool")}


def from_wire(item: dict) -> list[dict[str, torch.Tensor]]:
    """The batches of a wire item, as views into its one buffer (no copy).

    Runs in the main process for every batch, where each microsecond is taken from the
    workers' core: one typed view of the whole buffer per dtype, then a slice per array."""
    if "wire" not in item:
        return [item]
    buf = item["wire"]
    typed: dict[str, torch.Tensor] = {}
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(item["n"])]
    for i, key, dtype, shape, start in item["layout"]:
        view = typed.get(dtype)
        if view is None:
            view = typed[dtype] = buf.view(_TORCH_DTYPES[dtype])
        if len(shape) == 1:
            out[i][key] = view[start:start + shape[0]]
        elif not shape:
            out[i][key] = view[start]
        else:
            out[i][key] = view[start:start + math.prod(shape)].view(shape)
    return out


_WORKER_ERRORS = (StoreUnavailable, FetchError, CorruptSampleError)


def _clean_worker_errors(it):
    """The DataLoader re-raises a worker's exception with the worker's whole traceback as its
    message; the stream's own errors are one line to the user, so give them back their own message."""
    try:
        yield from it
    except _WORKER_ERRORS as exc:
        text = str(exc)
        if "Original Traceback" not in text:
            raise
        last = [ln for ln in text.strip().splitlines() if ln.strip()][-1]
        m = re.match(r"^[\w.]*?(\w+): (.*)$", last)
        msg = m.group(2) if m and m.group(1) == type(exc).__name__ else last
        raise type(exc)(msg) from None


@dataclass
class StreamState:
    epoch: int = 0
    consumed_windows: int = 0  # global windows of this epoch already delivered to training
    skipped: int = 0
    seed: int = 0
    mix: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class StreamLoader:
    """DataLoader over a MixtureStream that knows how far training got (for checkpoints).

    Each epoch is its own DataLoader (the epoch's plan is forked into its workers), and
    starting workers costs a few tenths of a second before the first batch: at the end of
    a short epoch the trainer would wait for it every time (10% of the steps of the demo's
    4-s epochs). So the next epoch's workers are started before this epoch ends
    (``prestart``), when at most ``max(4 * batches_per_transfer * num_workers, n // 4)``
    of the epoch's n batches remain; they fill their prefetch queue and wait. The next
    ``iter()`` takes them over if the state still points at the start of that epoch."""

    def __init__(self, stream: MixtureStream, num_workers: int = 2, pin_memory: bool | None = None,
                 prestart: bool = True):
        self.stream = stream
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prestart = prestart and num_workers > 0
        self.state = StreamState(seed=stream.config.seed, mix=stream.config.mix)
        self._next: tuple[tuple[int, int], object] | None = None  # ((epoch, start window), started iterator)
        self.prestarted_epochs = 0  # epochs that began on workers started ahead (tests, logs)

    def __len__(self) -> int:
        return self.stream.batches_per_rank(self.state.epoch, self.state.consumed_windows)

    def _start(self, epoch: int, start_window: int, skipped: int = 0):
        """An iterator over one epoch from start_window; with workers, they fork (and start) now."""
        s = self.stream
        s.epoch, s.start_window, s.start_skipped = epoch, start_window, skipped
        loader = DataLoader(s, batch_size=None, num_workers=self.num_workers, pin_memory=False,
                            prefetch_factor=2 if self.num_workers else None,
                            persistent_workers=False, multiprocessing_context="fork" if self.num_workers else None)
        return iter(loader)

    def __iter__(self):
        s = self.stream
        epoch, start = self.state.epoch, self.state.consumed_windows
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == (epoch, start):
            it = ahead[1]
            self.prestarted_epochs += 1
        else:
            del ahead  # a stale head start (the state was loaded since): its workers exit
            it = self._start(epoch, start, self.state.skipped)
        s.epoch, s.start_window, s.start_skipped = epoch, start, self.state.skipped
        n_epoch = len(s.plan())
        step = s.world_size * s.config.batch_size
        remaining = max(0, (n_epoch - start) // step)  # batches_per_rank, without planning the epoch again
        lead = max(4 * s.config.batches_per_transfer * self.num_workers, remaining // 4)
        budget = error_budget(s.config, n_epoch)
        for item in _clean_worker_errors(it):
            for batch in from_wire(item):
                self.state.consumed_windows += step
                self.state.skipped += int(batch["n_skipped"])
                if self.state.skipped > budget:  # the sum over workers (each also checks its own, per sample)
                    raise over_budget(s.config, self.state.skipped, n_epoch)
                remaining -= 1
                if self.prestart and self._next is None and remaining <= lead:
                    self._next = ((epoch + 1, 0), self._start(epoch + 1, 0))
                    s.epoch, s.start_window, s.start_skipped = epoch, start, self.state.skipped
                if self.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                yield batch
        self.state = replace(self.state, epoch=self.state.epoch + 1, consumed_windows=0, skipped=0)

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.state.seed) != self.state.seed or state.get("mix", self.state.mix) != self.state.mix:
            log.warning("resuming a stream with another seed or mixture: the global order changes")
        self.state = StreamState(**{k: state[k] for k in StreamState.__dataclass_fields__ if k in state})
        self._next = None  # workers started for the old position: let them go
