"""``python -m ingest run``: NWB files -> shards + Parquet tables, one Ray task per file.

The driver: it takes the store's lock, checks the settings (``ingest.config``), reads what earlier
runs did (``ingest.markers``), hands each source (``ingest.discover``) to a Ray task
(``ingest.task.ingest_file``), then writes the failures and rebuilds the tables from the done
markers (``ingest.tables``).

Resumability is by source checksum: when a file's shards are all published, its task writes
``_ingest/done/<sha256>.json``. The tables are always rebuilt from the markers, so an interrupted
run followed by a rerun gives the same tables as an uninterrupted run. A file that fails is
reported (one line, naming it), its published shards are removed, and the others carry on.

A task publishes (a shard, a marker) or deletes only while its run holds the store's lock and the
lock's holder is alive (``ingest.publish.RunStore``): a task orphaned by a killed driver, or by a
run whose lock was taken over, writes nothing more.
"""

from __future__ import annotations

import os
import time

from ingest.config import IngestConfig, check_config
from ingest.discover import Source, discover
from ingest.markers import previous_runs
from ingest.summary import IngestSummary, write_failures
from ingest.tables import rebuild_tables
from ingest.task import ingest_file
from shards.lock import StoreLock, describe_holder
from shards.store import Store


def ensure_ray(workers: int) -> None:
    """A local Ray cluster of ``workers`` CPUs (or the one at RAY_ADDRESS), unless Ray is up already."""
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


def _tally(summary: IngestSummary, source: Source, res: dict, bar, progress: bool) -> None:
    """Count one task's result in the summary (a failure also printed above the progress bar)."""
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


def _run_locked(store: Store, out: str, sources: list[Source], not_files: list[dict], workers: int,
                config: IngestConfig, progress: bool, rehash: bool, lock: StoreLock) -> IngestSummary:
    import ray
    from tqdm import tqdm

    store.clean_tmp()
    check_config(store, config)
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
            _tally(summary, source, res, bar, progress)
        submit()
    bar.close()
    lock.check()  # taken over while we ran (our heartbeat looked dead): publish nothing
    write_failures(store, summary)
    summary.tables = rebuild_tables(store)
    return summary
