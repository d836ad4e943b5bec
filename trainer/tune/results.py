"""SWEEP/results.parquet: one row per trial x held-out record x task, with a fixed schema.

The rows come from the trials' last reports (``trainer.tune.trial``: their ``rows``); the table is sorted
by its point and record columns, so the same sweep writes the same table whatever order trials ended
in. ``read`` gives it back as pandas for ``trainer.tune.report``.
"""

from __future__ import annotations

import io

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from shards.store import Store

RESULTS = "results.parquet"
SCHEMA = pa.schema([
    ("experiment", pa.string()),
    ("version", pa.int64()),
    ("ratio", pa.float64()),  # fraction of EPhys windows in pretraining
    ("seed", pa.int64()),
    ("set_size", pa.int64()),  # pretraining sessions per region (null: all)
    ("variant", pa.string()),
    ("ophys_regions", pa.string()),  # pretraining region subset: all | VISp | VISp+VISl
    ("ephys_regions", pa.string()),
    ("weights", pa.string()),  # --search bayes: the per-region mixture weights (JSON), else ""
    ("mix", pa.string()),  # the pretraining --mix
    ("session", pa.string()),  # the held-out session evaluated
    ("region", pa.string()),  # its region (a record is a session x region)
    ("task", pa.string()),
    ("modality", pa.string()),
    ("accuracy", pa.float64()),  # test split, one prediction per presentation (trainer.tally)
    ("n", pa.int64()),  # presentations behind it
    ("point", pa.string()),  # the trial's folder name (WORK/trials/<point>)
    ("trial_id", pa.string()),
])
SORT = ["experiment", "version", "ratio", "set_size", "variant", "ophys_regions", "ephys_regions", "weights", "seed",
        "modality", "region", "session", "task"]


def to_table(rows: list[dict], experiment: str, version: int) -> pa.Table:
    rows = [{**r, "experiment": experiment, "version": version} for r in rows]
    table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in SCHEMA} for r in rows], schema=SCHEMA)
    return table.sort_by([(c, "ascending") for c in SORT]) if len(table) else table


def write(sweep: Store, rows: list[dict], experiment: str, version: int) -> pa.Table:
    table = to_table(rows, experiment, version)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    sweep.write_bytes(RESULTS, buf.getvalue())
    return table


def read(sweep: Store) -> pd.DataFrame:
    if not sweep.exists(RESULTS):
        raise FileNotFoundError(f"{sweep.url(RESULTS)}: missing (run `python -m trainer.tune ... --out {sweep.uri}`)")
    table = pq.ParquetFile(pa.BufferReader(sweep.read_bytes(RESULTS))).read()
    return table.to_pandas()
