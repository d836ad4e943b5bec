"""Done markers: ``_ingest/done/<sha256>.json``, one per ingested source, what makes a run resumable.

When a file's shards are all published, its task writes a marker holding the rows it contributes
to the tables (``ingest.tables``), its URI and its ``source_fingerprint``. A rerun does not read a
source again when its fingerprint (size and mtime; size and ETag on S3) equals the one in its
marker, as rsync's quick check does (``--rehash`` hashes every source instead). A source whose
bytes changed gets its old session retired (shards and marker) and is ingested anew, so a session
is never in the tables twice.

A marker is data read back from the store: every path in it must stay inside the store
(``Store.resolve``), or the run stops with an error naming the marker before anything is deleted.
"""

from __future__ import annotations

import json
import os

from shards.store import Store, StoreError, is_remote, s3_filesystem

DONE_DIR = "_ingest/done"

_HEX = set("0123456789abcdef")


def marker_path(sha: str) -> str:
    """The store path of the done marker of the source whose bytes hash to ``sha``."""
    return f"{DONE_DIR}/{sha}.json"


def read_marker(store: Store, rel: str) -> dict:
    """A done marker, refused (StoreError naming it) unless it is a JSON object whose checksum is a
    sha256 and whose shard and chunk paths all stay inside the store."""
    where = store.url(rel)
    try:
        done = json.loads(store.read_bytes(rel))
    except json.JSONDecodeError as exc:
        raise StoreError(f"{where}: not a done marker ({exc}); remove it and rerun to ingest its source again"
                         ) from None
    sha = done.get("source_sha256") if isinstance(done, dict) else None
    if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX and isinstance(done.get("source"), str)):
        raise StoreError(f"{where}: not a done marker (needs a source and its sha256); remove it and rerun")
    for kind in ("shards", "chunks"):
        for row in done.get(kind, []):
            store.resolve(row.get("path") if isinstance(row, dict) else row, where)
    return done


def source_fingerprint(uri: str, fs=None) -> dict:
    """What tells a source's bytes apart without reading them: size and mtime (ns) of a local
    file, size and ETag of an S3 object (through ``fs`` when the caller has one)."""
    if is_remote(uri):
        info = (fs or s3_filesystem()).info(uri[len("s3://"):])
        return {"size": int(info["size"]), "etag": str(info.get("ETag") or info.get("etag") or "")}
    st = os.stat(uri)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def previous_runs(store: Store) -> dict[str, dict]:
    """Source URI -> {source_sha256, fingerprint} from the store's done markers."""
    out: dict[str, dict] = {}
    for rel in store.list(DONE_DIR, ".json"):
        done = read_marker(store, rel)
        out[done["source"]] = {"source_sha256": done["source_sha256"], "fingerprint": done.get("fingerprint")}
    return out


def retire(store: Store, previous: dict) -> None:
    """Drop a session ingested from an older version of its source: shards, then the marker
    (a crash in between leaves a marker whose shards are gone: the rerun retires it again)."""
    marker = marker_path(previous["source_sha256"])
    if not store.exists(marker):
        return
    done = read_marker(store, marker)  # every path checked before the first delete
    for row in done.get("shards", []):
        store.remove(row["path"], store.url(marker))
    store.remove(marker)


def already_done(store: Store, uri: str, sha: str, fp: dict) -> bool:
    """Whether these bytes are in the store; if they came from this URI, the marker learns the
    current fingerprint (a touched file), so the next rerun need not hash it."""
    marker = marker_path(sha)
    if not store.exists(marker):
        return False
    done = read_marker(store, marker)
    if done.get("source") == uri and done.get("fingerprint") != fp:
        done["fingerprint"] = fp
        store.write_bytes(marker, json.dumps(done, sort_keys=True).encode())
    return True
