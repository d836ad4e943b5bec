"""``python -m ingest run``: NWB files -> shards + Parquet tables, one Ray task per file.

Resumability is by source checksum: when a file's shards are all published, its
task writes ``_ingest/done/<sha256>.json`` (the rows it contributes to the
tables, and the file's fingerprint). The tables are always rebuilt from the
markers, so an interrupted run followed by a rerun gives the same tables as an
uninterrupted run. A file that fails is reported (one line, naming it), its
published shards are removed, and the others carry on.

A rerun does not read a source again when its fingerprint (size and mtime; size
and ETag on S3) equals the one in its marker, as rsync's quick check does
(``--rehash`` hashes every source instead). A source whose bytes changed gets its
old session retired (shards and marker) and is ingested anew, so a session is
never in the tables twice.

A marker is data read back from the store: every path in it must stay inside the store
(``Store.resolve``), or the run stops with an error naming the marker before anything is deleted.

A task publishes (a shard, a marker) or deletes only while its run holds the store's lock and the
lock's holder is alive (``RunStore``): a task orphaned by a killed driver, or by a run whose lock was
taken over, writes nothing more.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from shards import manifest
from shards.lock import LOCK, StoreLock, describe_holder
from shards.store import Store, StoreError, is_remote, s3_filesystem
from shards.writer import RecordShardWriter, sha256_file

from ingest.chunks import ChunkConfig, record_samples
from ingest.records import IngestError, SessionRecord
from ingest.regions import safe_component
from ingest.splits import SplitConfig, assign_splits

DONE_DIR = "_ingest/done"
FAILURES = "_ingest/failures.json"
CONFIG = "_ingest/config.json"


@dataclass(frozen=True)
class IngestConfig:
    chunk_s: float = 10.0
    shard_bytes: int = 64 << 20
    split: SplitConfig = field(default_factory=SplitConfig)

    def to_json(self) -> dict:
        d = asdict(self)
        d["split"]["fractions"] = list(d["split"]["fractions"])
        return d


@dataclass
class Source:
    uri: str  # local path or s3://...
    session_id: str


@dataclass
class IngestSummary:
    ok: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    tables: manifest.StoreTables | None = None
    seconds: float = 0.0
    source_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


# ---- discovery -------------------------------------------------------------------------------
def _not_a_file(p: Path) -> str:
    """Why a ``*.nwb`` entry that is not a regular file cannot be ingested (one line)."""
    if p.is_symlink() and not p.exists():
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        return f"broken symlink (points to {target}, which does not exist)"
    if p.is_dir():
        return "a directory named *.nwb, not an NWB file"
    return "not a regular file"


def discover(src: str, problems: list[dict] | None = None) -> list[Source]:
    """Every ``*.nwb`` under src (sorted), each with a session id that is a safe path component
    and unique in this listing (duplicated stems get a short hash of their relative path).

    ``*.nwb`` entries that are not files (directories, broken symlinks) are not sources; when
    ``problems`` is given, each is appended to it as ``{"file", "reason"}`` (the run reports them
    as failed files)."""
    if is_remote(src):
        store = Store(src)
        uris = [store.url(rel) for rel in store.list("", ".nwb")]
        if not uris:
            store.check()  # no such bucket / access denied, rather than "no .nwb files"
        rels = [u[len(store.url("")) + 1:] for u in uris]
    else:
        root = Path(src)
        if root.is_file():
            uris, rels = [str(root.resolve())], [root.name]
        elif root.is_dir():
            found = sorted(root.rglob("*.nwb"))
            files = [p for p in found if p.is_file()]
            if problems is not None:
                problems += [{"file": str(p.absolute()), "reason": _not_a_file(p)} for p in found if not p.is_file()]
            uris, rels = [str(p.resolve()) for p in files], [str(p.relative_to(root)) for p in files]
        else:
            raise FileNotFoundError(f"{src}: no such file or directory")
    ids = [safe_component(Path(r).stem) for r in rels]
    counts = Counter(ids)
    out = []
    for uri, rel, sid in zip(uris, rels, ids):
        if counts[sid] > 1:
            import hashlib

            sid = f"{sid}-{hashlib.sha1(rel.encode()).hexdigest()[:8]}"
        out.append(Source(uri, sid))
    return out


# ---- one file (runs inside a Ray task) -----------------------------------------------------------
class NotPublishing(StoreError):
    """This task's run no longer holds the store's lock: it publishes and deletes nothing."""


def _dying(pid: int) -> bool:
    """Whether a local process has been killed but not yet torn down: a SIGKILL pending (the kernel
    queues it on every thread as ``kill`` returns) or its main thread exiting (PF_EXITING). A big
    driver takes tens of ms from ``kill -9`` to zombie (measured 18-70 ms), long enough for a worker
    to publish a few shards if only the pid were checked."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            pending = [int(line.split()[1], 16) for line in fh if line.startswith(("SigPnd:", "ShdPnd:"))]
        with open(f"/proc/{pid}/stat", "rb") as fh:
            flags = int(fh.read().rsplit(b")", 1)[1].split()[6])
    except (OSError, ValueError, IndexError):
        return False  # gone (pid_alive says so), or no /proc: the pid check alone
    return any(p & (1 << (signal.SIGKILL - 1)) for p in pending) or bool(flags & 0x4)  # PF_EXITING


class RunStore(Store):
    """The store as one run's task sees it: each publish (``put_file``, ``write_bytes``) and delete
    first checks that the lock (``shards/lock.py``) still carries this run's token and that its holder
    is alive (its pid, on its host, and not being killed; its heartbeat, anywhere), else raises
    NotPublishing. So a task that outlives its driver (``kill -9``) or whose run lost the lock
    publishes nothing more. One read of a small object per shard."""

    def __init__(self, uri: str, token: str):
        super().__init__(uri)
        self.token = token
        self._judge = StoreLock(self)  # only its stale_reason: never acquired

    def check_run(self) -> None:
        try:
            info = json.loads(self.read_bytes(LOCK))
        except FileNotFoundError:
            info = None
        except ValueError:
            info = {}
        if not isinstance(info, dict) or info.get("token") != self.token:
            raise NotPublishing(f"{self.url(LOCK)}: this run's lock was released or taken over; publishing nothing")
        why = self._judge.stale_reason(info)
        pid = info.get("pid")
        if why is None and info.get("host") == socket.gethostname() and isinstance(pid, int) and _dying(pid):
            why = f"its pid {pid} was killed"
        if why:
            raise NotPublishing(f"{self.url(LOCK)}: this run's driver is gone ({why}); publishing nothing")

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.check_run()
        super().write_bytes(rel, data)

    def put_file(self, local_path: str, rel: str) -> None:
        self.check_run()
        super().put_file(local_path, rel)

    def remove(self, rel: str, source: str | None = None) -> None:
        self.check_run()
        super().remove(rel, source)


def _record_rows(rec: SessionRecord, sha: str, splits: dict) -> tuple[dict, list[dict]]:
    session = {
        "session_id": rec.session_id,
        "modality": rec.modality,
        "region": rec.region,
        "subject": rec.subject,
        "n_units": len(rec.unit_ids),
        "duration_s": rec.duration_s,
        "t_start": rec.t_start,
        "t_end": rec.t_end,
        "tasks": rec.tasks,
        "source_file": rec.source_file,
        "source_sha256": sha,
        "splits": json.dumps({k: [list(iv) for iv in v] for k, v in splits.items()}),
        "warnings": list(rec.warnings),
    }
    units = []
    for i, local in enumerate(rec.unit_ids):
        row = {
            "unit_id": f"{rec.session_id}/{local}",
            "session_id": rec.session_id,
            "modality": rec.modality,
            "region": rec.region,
            "local_id": local,
        }
        for k, col in rec.unit_meta.items():
            if k not in row:
                row[k] = col[i]
        units.append(row)
    return session, units


def _marker(sha: str) -> str:
    return f"{DONE_DIR}/{sha}.json"


_HEX = set("0123456789abcdef")


def read_marker(store: Store, rel: str) -> dict:
    """A done marker, refused (StoreError naming it) unless it is a JSON object whose checksum is a
    sha256 and whose shard and chunk paths all stay inside the store."""
    where = store.url(rel)
    try:
        done = json.loads(store.read_bytes(rel))
    except json.JSONDecodeError as exc:
        raise StoreError(f"{where}: not a done marker ({exc}); remove it and rerun to ingest its source again") from None
    sha = done.get("source_sha256") if isinstance(done, dict) else None
    if not (isinstance(sha, str) and len(sha) == 64 and set(sha) <= _HEX and isinstance(done.get("source"), str)):
        raise StoreError(f"{where}: not a done marker (needs a source and its sha256); remove it and rerun")
    for kind in ("shards", "chunks"):
        for row in done.get(kind, []):
            store.resolve(row.get("path") if isinstance(row, dict) else row, where)
    return done


def fingerprint(uri: str, fs=None) -> dict:
    """What tells a source's bytes apart without reading them: size and mtime (ns) of a local
    file, size and ETag of an S3 object (through ``fs`` when the caller has one)."""
    if is_remote(uri):
        info = (fs or s3_filesystem()).info(uri[len("s3://"):])
        return {"size": int(info["size"]), "etag": str(info.get("ETag") or info.get("etag") or "")}
    st = os.stat(uri)
    return {"size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _retire(store: Store, previous: dict) -> None:
    """Drop a session ingested from an older version of its source: shards, then the marker
    (a crash in between leaves a marker whose shards are gone: the rerun retires it again)."""
    marker = _marker(previous["source_sha256"])
    if not store.exists(marker):
        return
    done = read_marker(store, marker)  # every path checked before the first delete
    for row in done.get("shards", []):
        store.remove(row["path"], store.url(marker))
    store.remove(marker)


def _already_done(store: Store, uri: str, sha: str, fp: dict) -> bool:
    """Whether these bytes are in the store; if they came from this URI, the marker learns the
    current fingerprint (a touched file), so the next rerun need not hash it."""
    marker = _marker(sha)
    if not store.exists(marker):
        return False
    done = read_marker(store, marker)
    if done.get("source") == uri and done.get("fingerprint") != fp:
        done["fingerprint"] = fp
        store.write_bytes(marker, json.dumps(done, sort_keys=True).encode())
    return True


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
        fp = fingerprint(source.uri, src_fs)
        if (previous and not rehash and previous.get("fingerprint") == fp
                and store.exists(_marker(previous["source_sha256"]))):
            return {"status": "skipped", "source": source.uri, "bytes": fp["size"], "seconds": time.perf_counter() - t0}
        if src_fs is not None:
            fd, tmp_download = tempfile.mkstemp(suffix=".nwb")
            os.close(fd)
            src_fs.get_file(source.uri[len("s3://"):], tmp_download)
            local = tmp_download
        size = os.path.getsize(local)
        # (hashing in a thread while pynwb reads was measured: no faster, pynwb holds the GIL)
        sha = sha256_file(local)
        if _already_done(store, source.uri, sha, fp):  # touched, or the same bytes under another name
            return {"status": "skipped", "source": source.uri, "bytes": size, "seconds": time.perf_counter() - t0}
        marker = _marker(sha)
        sessions, units = [], []
        with open_records(local, source.session_id) as records:
            if previous and previous.get("source_sha256") != sha:
                _retire(store, previous)  # the source changed: its old session goes
            for rec in records:
                rec.source_file = source.uri
                # chunks are half-open [a, b): make the end exclusive so the last spike/frame is kept
                rec.t_end = float(np.nextafter(rec.t_end, np.inf))
                splits = assign_splits(rec.session_id, rec.region, rec.t_start, rec.t_end, rec.stimuli, config.split)
                w = RecordShardWriter(store, rec.modality, rec.region, rec.session_id, config.shard_bytes)
                writers.append(w)
                for split, sample in record_samples(rec, splits, ChunkConfig(config.chunk_s)):
                    w.add(split, sample)
                w.close()
                s_row, u_rows = _record_rows(rec, sha, splits)
                sessions.append(s_row)
                units += u_rows
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
        store.write_bytes(marker, json.dumps(done, sort_keys=True).encode())
        return {"status": "ok", "source": source.uri, "bytes": size, "seconds": time.perf_counter() - t0,
                "warnings": [w for s in sessions for w in s["warnings"]]}
    except Exception as exc:  # one bad file must not stop the others
        for w in writers:
            w.abort()
        if not isinstance(exc, NotPublishing):  # (not our lock any more: what is there may be another run's)
            with contextlib.suppress(NotPublishing):
                for w in writers:
                    for row in w.shard_rows:
                        store.remove(row["path"])
        reason = str(exc) if isinstance(exc, IngestError) else f"{type(exc).__name__}: {exc}"
        result = {"status": "failed", "source": source.uri, "reason": reason.splitlines()[0] if reason else type(exc).__name__,
                  "seconds": time.perf_counter() - t0}
        if not isinstance(exc, IngestError):
            result["traceback"] = traceback.format_exc()
        return result
    finally:
        if tmp_download and os.path.exists(tmp_download):
            os.remove(tmp_download)


def previous_runs(store: Store) -> dict[str, dict]:
    """Source URI -> {source_sha256, fingerprint} from the store's done markers."""
    out: dict[str, dict] = {}
    for rel in store.list(DONE_DIR, ".json"):
        done = read_marker(store, rel)
        out[done["source"]] = {"source_sha256": done["source_sha256"], "fingerprint": done.get("fingerprint")}
    return out


# ---- tables -------------------------------------------------------------------------------------
def rebuild_tables(store: Store) -> manifest.StoreTables:
    """All tables from the done markers; deterministic (rows sorted inside write_table)."""
    rows: dict[str, list[dict]] = defaultdict(list)
    for rel in store.list(DONE_DIR, ".json"):
        done = read_marker(store, rel)
        rows[manifest.MANIFEST] += done["shards"]
        rows[manifest.SESSIONS] += done["sessions"]
        rows[manifest.UNITS] += done["units"]
        rows[manifest.CHUNKS] += done["chunks"]
    # manifest last: its presence means the other tables are complete
    tables = {name: manifest.write_table(store, name, rows[name])
              for name in (manifest.SESSIONS, manifest.UNITS, manifest.CHUNKS, manifest.MANIFEST)}
    return manifest.StoreTables(tables[manifest.MANIFEST], tables[manifest.SESSIONS],
                                tables[manifest.UNITS], tables[manifest.CHUNKS])


def _check_config(store: Store, config: IngestConfig) -> None:
    want = config.to_json()
    if store.exists(CONFIG):
        have = json.loads(store.read_bytes(CONFIG))
        if have != want:
            raise ValueError(
                f"{store.url(CONFIG)}: this store was ingested with different settings {have}; "
                f"use a new --out (or the same settings) so shards stay consistent"
            )
    else:
        store.write_bytes(CONFIG, json.dumps(want, sort_keys=True).encode())


# ---- driver ---------------------------------------------------------------------------------------
def ensure_ray(workers: int) -> None:
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or "local"
    kwargs: dict = {"address": address, "logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False}
    if address == "local":
        kwargs.update(num_cpus=workers, object_store_memory=256 << 20)
    ray.init(**kwargs)


def run_ingest(src: str, out: str, workers: int = 2, config: IngestConfig = IngestConfig(),
               progress: bool = True, rehash: bool = False) -> IngestSummary:
    t0 = time.perf_counter()
    store = Store(out)
    store.check()  # S3: the bucket exists and the credentials work, before anything starts
    not_files: list[dict] = []
    sources = discover(src, not_files)
    if not sources and not not_files:
        raise FileNotFoundError(f"{src}: no .nwb files found")
    # one writer at a time: a second run is refused naming this one (its .tmp cleanup and its
    # failures.json would break ours); a dead holder's stale lock is taken over
    with StoreLock(store, owner=f"ingest run --src {src}") as lock:
        summary = _run_locked(store, out, sources, not_files, workers, config, progress, rehash, lock)
    if lock.took_over:
        summary.notes.append(f"took over the stale lock of {describe_holder(lock.took_over)}: {lock.took_over['why']}")
    summary.seconds = time.perf_counter() - t0
    return summary


def _run_locked(store: Store, out: str, sources: list[Source], not_files: list[dict], workers: int,
                config: IngestConfig, progress: bool, rehash: bool, lock: StoreLock) -> IngestSummary:
    import ray
    from tqdm import tqdm

    store.clean_tmp()
    _check_config(store, config)
    previous = previous_runs(store)
    ensure_ray(workers)
    task = ray.remote(num_cpus=1, max_retries=2)(ingest_file)
    summary = IngestSummary()
    summary.failed += not_files  # *.nwb entries that are not files: failed, never silently skipped
    pending: dict = {}
    it = iter(sources)
    bar = tqdm(total=len(sources), unit="file", desc="ingest", disable=not progress)

    def submit() -> None:
        for s in it:
            pending[task.remote(s, out, config, previous.get(s.uri), rehash, lock.token)] = s
            if len(pending) >= 2 * workers:
                return

    submit()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            source = pending.pop(ref)
            try:
                res = ray.get(ref)
            except Exception as exc:  # the worker itself died (OOM kill, segfault) after retries
                res = {"status": "failed", "source": source.uri, "reason": f"worker died: {type(exc).__name__}"}
            summary.source_bytes += res.get("bytes", 0)
            if res["status"] == "ok":
                summary.ok.append(source.uri)
            elif res["status"] == "skipped":
                summary.skipped.append(source.uri)
            else:
                summary.failed.append({"file": source.uri, "reason": res["reason"]})
                if progress:
                    bar.write(f"FAILED {source.uri}: {res['reason']}")
            bar.update(1)
        submit()
    bar.close()
    lock.check()  # taken over while we ran (our heartbeat looked dead): publish nothing
    store.write_bytes(FAILURES, json.dumps(sorted(summary.failed, key=lambda f: f["file"]), indent=1).encode())
    summary.tables = rebuild_tables(store)
    return summary


def format_summary(summary: IngestSummary, out: str) -> str:
    """The one-screen summary: files, then sessions/units/samples/MB per modality and region."""
    t = summary.tables
    lines = [f"ingest: {len(summary.ok)} ingested, {len(summary.skipped)} already done, "
             f"{len(summary.failed)} failed in {summary.seconds:.1f} s -> {out}"]
    if t is not None and t.manifest.num_rows:
        sessions = t.sessions.to_pandas()
        shards = t.manifest.to_pandas()
        g_s = sessions.groupby(["modality", "region"]).agg(records=("session_id", "count"), units=("n_units", "sum"))
        g_m = shards.groupby(["modality", "region"]).agg(shards=("path", "count"), samples=("n_samples", "sum"),
                                                         mb=("n_bytes", lambda b: b.sum() / 1e6))
        table = g_s.join(g_m, how="outer").fillna(0)
        lines.append(f"{'modality':9} {'region':10} {'records':>7} {'units':>7} {'shards':>7} {'samples':>8} {'MB':>9}")
        for (mod, reg), r in table.iterrows():
            lines.append(f"{mod:9} {reg:10} {int(r.records):7d} {int(r.units):7d} {int(r.shards):7d} "
                         f"{int(r.samples):8d} {r.mb:9.2f}")
        tot = table.sum()
        lines.append(f"{'total':9} {'':10} {int(tot.records):7d} {int(tot.units):7d} {int(tot.shards):7d} "
                     f"{int(tot.samples):8d} {tot.mb:9.2f}")
    for f in summary.failed:
        lines.append(f"FAILED {f['file']}: {f['reason']}")
    lines += [f"note: {n}" for n in summary.notes]
    if summary.failed:
        lines.append(f"failures written to {Store(out).url(FAILURES)}")
    return "\n".join(lines)
