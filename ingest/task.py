"""One source file -> its shards and done marker: the per-file task a run hands to Ray.

A file that fails is reported (one line, naming it), its published shards are removed, and the
others carry on: ``ingest_file`` never raises for bad input. A file already in the store (same
fingerprint as its marker, or the same bytes) is skipped; a changed one has its old session
retired first (``ingest.markers``).
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import traceback
from collections.abc import Iterable

import numpy as np

from ingest.chunks import ChunkConfig, chunk_samples
from ingest.config import IngestConfig
from ingest.discover import Source
from ingest.markers import already_done, marker_path, retire, source_fingerprint
from ingest.publish import NotPublishing, RunStore
from ingest.records import IngestError, SessionRecord
from ingest.splits import assign_splits
from ingest.tables import table_rows
from shards.store import Store, is_remote
from shards.writer import RecordShardWriter, sha256_file


def _download(src_fs, uri: str) -> str:
    """An S3 source copied to a local temp file (the caller removes it; a failed copy removes it here)."""
    fd, tmp = tempfile.mkstemp(suffix=".nwb")
    os.close(fd)
    try:
        src_fs.get_file(uri[len("s3://"):], tmp)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def _write_records(records: Iterable[SessionRecord], store: Store, uri: str, sha: str, config: IngestConfig,
                   writers: list[RecordShardWriter]) -> tuple[list[dict], list[dict]]:
    """Shards of every record (each writer appended to ``writers`` as it starts, so a failure can
    abort them); returns the sessions and units rows."""
    sessions, units = [], []
    for rec in records:
        rec.source_file = uri
        # chunks are half-open [a, b): make the end exclusive so the last spike/frame is kept
        rec.t_end = float(np.nextafter(rec.t_end, np.inf))
        splits = assign_splits(rec.session_id, rec.region, rec.t_start, rec.t_end, rec.stimuli, config.split)
        w = RecordShardWriter(store, rec.modality, rec.region, rec.session_id, config.shard_bytes)
        writers.append(w)
        for split, sample in chunk_samples(rec, splits, ChunkConfig(config.chunk_s)):
            w.add(split, sample)
        w.close()
        s_row, u_rows = table_rows(rec, sha, splits)
        sessions.append(s_row)
        units += u_rows
    return sessions, units


def _failed(exc: Exception, store: Store, writers: list[RecordShardWriter], source: Source, t0: float) -> dict:
    """Undo a failed file (abort its writers, remove what it published) and say why, in one line.
    Called from the ``except`` block: the traceback is the one being handled."""
    for w in writers:
        w.abort()
    if not isinstance(exc, NotPublishing):  # (not our lock any more: what is there may be another run's)
        with contextlib.suppress(NotPublishing):
            for w in writers:
                for row in w.shard_rows:
                    store.remove(row["path"])
    reason = str(exc) if isinstance(exc, IngestError) else f"{type(exc).__name__}: {exc}"
    result = {"status": "failed", "source": source.uri,
              "reason": reason.splitlines()[0] if reason else type(exc).__name__, "seconds": time.perf_counter() - t0}
    if not isinstance(exc, IngestError):
        result["traceback"] = traceback.format_exc()
    return result


def ingest_file(source: Source, store_uri: str, config: IngestConfig, previous: dict | None = None,
                rehash: bool = False, lock_token: str | None = None) -> dict:
    """Ingest one NWB file; never raises for bad input (returns status 'failed' and a reason).

    ``previous``: what the store's marker for this source URI says (its sha256 and fingerprint),
    if any. ``lock_token``: the run's store lock; when given, nothing is written unless the run
    still holds it (``RunStore``)."""
    from ingest.readers import open_records  # imported here: heavy (pynwb), and only workers need it

    t0 = time.perf_counter()
    store = RunStore(store_uri, lock_token) if lock_token else Store(store_uri)
    local, tmp_download = source.uri, None
    writers: list[RecordShardWriter] = []
    try:
        src_fs = Store(source.uri.rsplit("/", 1)[0]).fs if is_remote(source.uri) else None
        fp = source_fingerprint(source.uri, src_fs)
        if (previous and not rehash and previous.get("fingerprint") == fp
                and store.exists(marker_path(previous["source_sha256"]))):
            return {"status": "skipped", "source": source.uri, "bytes": fp["size"], "seconds": time.perf_counter() - t0}
        if src_fs is not None:
            local = tmp_download = _download(src_fs, source.uri)
        size = os.path.getsize(local)
        # (hashing in a thread while pynwb reads was measured: no faster, pynwb holds the GIL)
        sha = sha256_file(local)
        if already_done(store, source.uri, sha, fp):  # touched, or the same bytes under another name
            return {"status": "skipped", "source": source.uri, "bytes": size, "seconds": time.perf_counter() - t0}
        with open_records(local, source.session_id) as records:
            if previous and previous.get("source_sha256") != sha:
                retire(store, previous)  # the source changed: its old session goes
            sessions, units = _write_records(records, store, source.uri, sha, config, writers)
        done = {
            "source": source.uri,
            "source_sha256": sha,
            "fingerprint": fp,
            "session_id": source.session_id,
            "sessions": sessions,
            "units": units,
            "shards": [r for w in writers for r in w.shard_rows],
            "chunks": [r for w in writers for r in w.chunk_rows],
        }
        store.write_bytes(marker_path(sha), json.dumps(done, sort_keys=True).encode())
        return {"status": "ok", "source": source.uri, "bytes": size, "seconds": time.perf_counter() - t0,
                "warnings": [w for s in sessions for w in s["warnings"]]}
    except Exception as exc:  # one bad file must not stop the others
        return _failed(exc, store, writers, source, t0)
    finally:
        if tmp_download and os.path.exists(tmp_download):
            os.remove(tmp_download)
