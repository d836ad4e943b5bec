"""Check every shard of a store against its manifest row: present, size, sha256, sample count.

A manifest or chunk-table path that would leave the store is a problem, and is never opened."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from . import manifest
from .format import iter_tar_samples
from .store import Store, UnsafeKeyError


@dataclass
class Problem:
    path: str
    reason: str


def verify_store(store: Store, progress: bool = False) -> tuple[int, list[Problem]]:
    """(number of shards checked, problems). Stray .tar files not in the manifest are problems too."""
    from tqdm import tqdm

    table = manifest.read_table(store, manifest.MANIFEST, check_paths=False).to_pylist()
    problems: list[Problem] = []
    listed = {r["path"] for r in table}
    if store.exists(manifest.CHUNKS):  # its paths are what the stream opens: refused the same way
        chunks = manifest.read_table(store, manifest.CHUNKS, check_paths=False)
        for rel in manifest.unsafe_paths(chunks):
            problems.append(Problem(rel, f"refused, not read: {store.url(manifest.CHUNKS)} lists a path outside the store"))
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
    for rel in store.list("", ".tar"):
        if rel not in listed:
            problems.append(Problem(rel, "shard not listed in the manifest"))
    return len(table), problems
