"""The store's tables from the done markers: the rows one record contributes, and every table rebuilt.

The tables are always rebuilt from the markers (``ingest.markers``), never appended to, so an
interrupted run followed by a rerun gives the same tables as an uninterrupted run.
"""

from __future__ import annotations

import json
from collections import defaultdict

from ingest.markers import DONE_DIR, read_marker
from ingest.records import SessionRecord
from shards import manifest
from shards.store import Store


def table_rows(rec: SessionRecord, sha: str, splits: dict) -> tuple[dict, list[dict]]:
    """(its sessions.parquet row, its units.parquet rows) of one record of the source hashing to ``sha``."""
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
