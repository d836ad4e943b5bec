"""Check every shard of a store against its manifest row: present, size, sha256, sample count.

A manifest or chunk-table path that would leave the store is a problem, and is never opened.

``deep=True`` (``shards verify --deep``) also decodes every sample of chunks.parquet the way the
stream does (``shards.stream.integrity.decode_chunk``: the sample's xxh3, the lean tar/.npy reader, one
sample with its key, units and record known to the tables), and names each bad sample; it does so
even in a shard whose sha256 differs, so the report says which samples of it are bad."""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

from shards import manifest
from shards.format import iter_tar_samples
from shards.store import Store, UnsafeKeyError
from shards.stream.integrity import COLUMN, decode_chunk
from shards.stream.tokens import Vocab

log = logging.getLogger(__name__)


@dataclass
class Problem:
    path: str
    reason: str


def _deep_context(store: Store, chunks, problems: list[Problem]):
    """(rows of chunks.parquet by shard path, vocab) for the deep check."""

    if chunks is None:
        problems.append(Problem(manifest.CHUNKS, "missing: samples cannot be decoded one by one"))
        return {}, None
    vocab = Vocab.from_tables(manifest.read_table(store, manifest.UNITS).to_pandas(),
                              manifest.read_table(store, manifest.SESSIONS).to_pandas())
    by_path: dict[str, list[dict]] = {}
    cols = ["path", "key", "offset", "length"] + ([COLUMN] if COLUMN in chunks.column_names else [])
    for r in chunks.select(cols).to_pylist():
        by_path.setdefault(r["path"], []).append(r)
    if COLUMN not in chunks.column_names:  # an older store: not a problem, but say what was not checked
        log.warning("%s has no %s column (written before per-sample checksums): samples decoded, their bytes "
                    "not checked against a checksum", store.url(manifest.CHUNKS), COLUMN)
    return by_path, vocab


def _deep_check(rel: str, data: bytes, rows: list[dict], vocab) -> list[Problem]:

    out = []
    mv = memoryview(data)
    for r in rows:
        start, end = r["offset"], r["offset"] + r["length"]
        if start < 0 or end > len(data):
            out.append(Problem(rel, f"sample {r['key']}: bytes {start}-{end} are outside the shard's {len(data)}"))
            continue
        try:
            decode_chunk(mv[start:end], r["key"], vocab, r.get(COLUMN))
        except Exception as exc:  # whatever the stream would trip on is what --deep reports
            out.append(Problem(rel, f"sample {r['key']} (bytes {start}-{end}): {type(exc).__name__}: {exc}"))
    return out


def verify_store(store: Store, progress: bool = False, deep: bool = False) -> tuple[int, list[Problem]]:
    """(number of shards checked, problems). Stray .tar files not in the manifest are problems too."""
    from tqdm import tqdm

    table = manifest.read_table(store, manifest.MANIFEST, check_paths=False).to_pylist()
    problems: list[Problem] = []
    listed = {r["path"] for r in table}
    chunks = None
    if store.exists(manifest.CHUNKS):  # its paths are what the stream opens: refused the same way
        chunks = manifest.read_table(store, manifest.CHUNKS, check_paths=False)
        for rel in manifest.unsafe_paths(chunks):
            problems.append(Problem(rel, f"refused, not read: {store.url(manifest.CHUNKS)} lists a path outside the store"))
    by_path, vocab = _deep_context(store, chunks, problems) if deep else ({}, None)
    for row in tqdm(table, unit="shard", desc="verify", disable=not progress):
        rel = row["path"]
        try:
            store.resolve(rel, store.url(manifest.MANIFEST))
        except UnsafeKeyError:
            problems.append(Problem(rel, f"refused, not read: {store.url(manifest.MANIFEST)} lists a path outside the store"))
            continue
        if not store.exists(rel):
            problems.append(Problem(rel, "listed in the manifest but missing"))
            continue
        data = store.read_bytes(rel)
        if vocab is not None:
            problems += _deep_check(rel, data, by_path.get(rel, []), vocab)
        if len(data) != row["n_bytes"]:
            problems.append(Problem(rel, f"size {len(data)} bytes, manifest says {row['n_bytes']}"))
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest != row["sha256"]:
            problems.append(Problem(rel, f"sha256 {digest[:12]}... differs from the manifest's {row['sha256'][:12]}..."))
            continue
        try:
            n = sum(1 for _ in iter_tar_samples(io.BytesIO(data)))
        except Exception as exc:  # a tar we cannot parse is exactly what verify must report
            problems.append(Problem(rel, f"unreadable tar: {exc}"))
            continue
        if n != row["n_samples"]:
            problems.append(Problem(rel, f"{n} samples, manifest says {row['n_samples']}"))
    for rel in sorted(set(by_path) - listed - set(manifest.unsafe_paths(chunks) if chunks is not None else ()), key=repr):
        problems.append(Problem(rel, f"{len(by_path[rel])} samples in {manifest.CHUNKS}, but no such shard in the manifest"))
    for rel in store.list("", ".tar"):
        if rel not in listed:
            problems.append(Problem(rel, "shard not listed in the manifest"))
    return len(table), problems
