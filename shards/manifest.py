"""The store's tables: manifest (shards), sessions (records), units, chunks (samples).

``manifest.parquet``, ``sessions.parquet`` and ``units.parquet`` are the design
contract. ``chunks.parquet`` is our addition (docs/store.md): one row per sample
with its byte range in the shard, so the stream can plan windows and fetch a
single sample with one ranged GET without listing or opening any shard.

Each table has a fixed schema (declared once here) so an empty store and a full
one have the same columns, and files are written atomically through the Store.
Reading a table with a ``path`` column (manifest, chunks) refuses it when a path would
leave the store (``Store.resolve``), naming the table.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from shards.fastread import iter_samples
from shards.store import Store, StoreError, safe_key

MANIFEST = "manifest.parquet"
SESSIONS = "sessions.parquet"
UNITS = "units.parquet"
CHUNKS = "chunks.parquet"

MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("modality", pa.string()),
        ("region", pa.string()),
        ("session_id", pa.string()),
        ("split", pa.string()),
        ("n_samples", pa.int64()),
        ("n_bytes", pa.int64()),
        ("sha256", pa.string()),
        ("t_start", pa.float64()),
        ("t_end", pa.float64()),
    ]
)
SESSIONS_SCHEMA = pa.schema(
    [
        ("session_id", pa.string()),
        ("modality", pa.string()),
        ("region", pa.string()),
        ("subject", pa.string()),
        ("n_units", pa.int64()),
        ("duration_s", pa.float64()),
        ("t_start", pa.float64()),
        ("t_end", pa.float64()),
        ("tasks", pa.list_(pa.string())),
        ("source_file", pa.string()),
        ("source_sha256", pa.string()),
        ("splits", pa.string()),  # JSON: {"train": [[a, b], ...], "valid": [...], "test": [...]}
        ("warnings", pa.list_(pa.string())),
    ]
)
CHUNKS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("key", pa.string()),
        ("session_id", pa.string()),
        ("modality", pa.string()),
        ("region", pa.string()),
        ("split", pa.string()),
        ("t_start", pa.float64()),
        ("t_end", pa.float64()),
        ("offset", pa.int64()),
        ("length", pa.int64()),
        ("n_units", pa.int64()),
        ("n_events", pa.int64()),  # spikes (EPhys) or kept frames (OPhys)
        ("n_queries", pa.int64()),  # labelled presentations overlapping the chunk
        ("xxh3", pa.string()),  # XXH3-64 (hex) of the sample's bytes; null in stores written before it
    ]
)
# units.parquet: these columns first, then whatever each file says of its units (as strings).
UNITS_BASE = ("unit_id", "session_id", "modality", "region", "local_id")

TABLE_SCHEMAS = {MANIFEST: MANIFEST_SCHEMA, SESSIONS: SESSIONS_SCHEMA, CHUNKS: CHUNKS_SCHEMA}
SORT_KEYS = {
    MANIFEST: ["path"],
    SESSIONS: ["session_id", "modality", "region"],
    CHUNKS: ["path", "offset"],
    UNITS: ["unit_id", "region"],
}


def to_table(name: str, rows: list[dict]) -> pa.Table:
    """Rows -> table with the declared schema (units: base columns + sorted extras, as strings)."""
    rows = sorted(rows, key=lambda r: tuple(r[k] for k in SORT_KEYS[name]))
    if name in TABLE_SCHEMAS:
        schema = TABLE_SCHEMAS[name]
        return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)
    extras = sorted({k for r in rows for k in r} - set(UNITS_BASE))
    cols = list(UNITS_BASE) + extras
    schema = pa.schema([(c, pa.string()) for c in cols])
    data = [{c: (None if r.get(c) is None else str(r[c])) for c in cols} for r in rows]
    return pa.Table.from_pylist(data, schema=schema)


def write_table(store: Store, name: str, rows: list[dict]) -> pa.Table:
    table = to_table(name, rows)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    store.write_bytes(name, buf.getvalue())
    return table


PATH_TABLES = (MANIFEST, CHUNKS)


def unsafe_paths(table: pa.Table) -> list[str]:
    """The distinct values of a table's ``path`` column that would leave the store (sorted)."""
    if "path" not in table.column_names:
        return []
    bad = []
    for p in table.column("path").unique().to_pylist():
        try:
            safe_key(p)
        except ValueError:
            bad.append(p)
    return sorted(bad, key=repr)


def read_table(store: Store, name: str, check_paths: bool = True) -> pa.Table:
    """One table; with ``check_paths`` (the default) a manifest or chunk table whose ``path`` column
    would leave the store is refused with UnsafeKeyError naming the table."""
    if not store.exists(name):
        store.check()  # a missing bucket or denied access is said as such, not as a missing table
        raise FileNotFoundError(f"{store.url(name)}: missing (is {store.uri} a shard store? run `python -m ingest run`)")
    data = store.read_bytes(name)
    try:
        # ParquetFile, not pq.read_table: the dataset reader's threads over an in-memory buffer make
        # pyarrow 26 abort at interpreter exit ("terminate called without an active exception") in
        # about half of short-lived processes here (measured 10/20); ParquetFile.read: 0/40
        table = pq.ParquetFile(pa.BufferReader(data)).read()
    except (pa.ArrowException, OSError) as exc:
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = why.split("'<Buffer>': ", 1)[-1]  # pyarrow names the buffer, not the file
        raise StoreError(f"{store.url(name)}: not a readable Parquet table ({why}); the tables are rebuilt from "
                         f"the done markers by rerunning `python -m ingest run --out {store.uri}`") from None
    if check_paths and name in PATH_TABLES:
        bad = unsafe_paths(table)
        if bad:
            safe_key(bad[0], store.url(name), store.uri)  # raises, naming the table
    return table


@dataclass
class StoreTables:
    manifest: pa.Table
    sessions: pa.Table
    units: pa.Table
    chunks: pa.Table


def load(store: Store) -> StoreTables:
    """The four tables, read side by side (on S3 each is a few round trips)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as ex:
        return StoreTables(*ex.map(lambda n: read_table(store, n), (MANIFEST, SESSIONS, UNITS, CHUNKS)))


def record_samples(store: Store, chunks, session: str, region: str, split: str):
    """The samples of one record's split in time order, each read by its byte range.
    ``chunks``: the chunk table as a pandas DataFrame (convert it once, not per record)."""
    c = chunks[(chunks.session_id == session) & (chunks.region == region) & (chunks.split == split)]
    for path, offset, length in zip(*(c.sort_values("t_start")[k] for k in ("path", "offset", "length"))):
        yield from iter_samples(store.read_range(path, int(offset), int(offset + length)))
