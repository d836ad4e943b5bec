"""EPhys from an NWB 2 Units table: one :class:`SessionRecord` per brain region.

Nothing is read through ``to_dataframe()``: spike times are sliced per unit with the
``spike_times_index`` boundaries, other unit columns are read one by one and only when they
hold one scalar per unit (waveforms, amplitudes and other ragged columns are never touched).

Unit -> region, first fallback that names a region wins (recorded per unit in
``unit_meta['region_source']``):

1. ``units.peak_channel_id`` -> electrodes row with that **id** -> ``location`` (Allen Neuropixels)
2. ``units.electrodes`` region -> majority ``location`` of the referenced electrode rows
3. ``units.location``
4. ``units.electrode_group`` -> ``ElectrodeGroup.location``
5. the electrode group of the unit's electrode row (from 1 or 2) -> ``location``
6. when the file links units to no electrode at all: the one ``location`` all electrodes share

Values are parsed with :func:`ingest.regions.region_name` (bytes, ``brain_region: ALM; ...``
compound strings, placeholders -> ``unknown``).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from ingest.readers.validate import clean_spike_train, unique_ids
from ingest.records import IngestError, SessionRecord
from ingest.regions import UNKNOWN, decode, parse_region, region_name

#: Unit columns never copied into unit_meta (large, ragged or handled separately).
NON_META_COLUMNS = {
    "spike_times", "spike_amplitudes", "amplitudes", "waveform_mean", "waveform_sd", "waveforms",
    "obs_intervals", "electrodes",
}


def py_value(v: Any) -> Any:
    """A plain Python scalar for unit_meta (bytes decoded, numpy unwrapped, containers by name)."""
    if isinstance(v, (bytes, bytearray)):
        return decode(v)
    if isinstance(v, np.generic):
        v = v.item()
        return decode(v) if isinstance(v, bytes) else v
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    name = getattr(v, "name", None)
    return str(name) if name is not None else str(v)


def _kind(col: Any) -> str:
    return type(col).__name__


def scalar_columns(table: Any, n: int, rows: np.ndarray | None = None, exclude: set[str] = frozenset()) -> dict[str, list]:
    """Columns of a DynamicTable that hold one scalar per row, as lists of Python values."""
    out: dict[str, list] = {}
    for name in table.colnames:
        if name in exclude:
            continue
        try:
            col = table[name]
        except (KeyError, ValueError):
            continue
        if _kind(col) in ("VectorIndex", "DynamicTableRegion"):
            continue
        data = getattr(col, "data", None)
        shape = getattr(data, "shape", None)
        if data is None or shape is None or len(shape) != 1 or shape[0] != n:
            continue
        dtype = getattr(data, "dtype", None)
        if dtype is not None and getattr(dtype, "names", None):
            continue  # compound
        try:
            values = list(data[:])
        except (OSError, TypeError, ValueError):
            continue
        if rows is not None:
            values = [values[int(i)] for i in rows]
        out[name] = [py_value(v) for v in values]
    return out


def _locations_of(table: Any) -> list[str] | None:
    if table is None or "location" not in table.colnames:
        return None
    return [decode(v) for v in table["location"].data[:]]


def _group_locations_of(table: Any) -> list[str] | None:
    if table is None or "group" not in table.colnames:
        return None
    try:
        return [decode(getattr(g, "location", "") or "") for g in table["group"].data[:]]
    except (OSError, TypeError, ValueError, AttributeError):
        return None


def _unit_electrode_rows(units: Any, n: int) -> tuple[list[np.ndarray], Any] | None:
    """Per unit the electrode table rows of the ``electrodes`` column, and that table."""
    if "electrodes" not in units.colnames:
        return None
    col = units["electrodes"]
    if _kind(col) == "VectorIndex":
        bounds = np.asarray(col.data[:], dtype=np.int64)
        region = col.target
        rows = np.asarray(region.data[:], dtype=np.int64)
        starts = np.r_[0, bounds[:-1]]
        return [rows[a:b] for a, b in zip(starts, bounds)], region.table
    if _kind(col) == "DynamicTableRegion":
        rows = np.asarray(col.data[:], dtype=np.int64).ravel()
        if n == 0 or rows.size % n:
            return None
        return list(rows.reshape(n, -1)), col.table
    return None


def unit_locations(nwb: Any, units: Any, n: int) -> tuple[list[str], list[str]]:
    """(raw location string, source name) per unit, following the module's fallback order."""
    candidates: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    electrodes = nwb.electrodes
    group_rows: list[list[int]] = [[] for _ in range(n)]
    group_locs = None

    # 1. peak_channel_id -> electrodes row by id
    locs = _locations_of(electrodes)
    if "peak_channel_id" in units.colnames and electrodes is not None:
        row_of = {int(e): i for i, e in enumerate(np.asarray(electrodes.id.data[:]))}
        for u, pc in enumerate(np.asarray(units["peak_channel_id"].data[:]).ravel()):
            try:
                row = row_of.get(int(pc))
            except (TypeError, ValueError):
                row = None
            if row is None:
                continue
            group_rows[u].append(row)
            if locs is not None:
                candidates[u].append(("peak_channel_id->electrodes.location", locs[row]))
    # 2. electrodes region -> majority location
    found = _unit_electrode_rows(units, n)
    if found is not None:
        per_unit, table = found
        tlocs = locs if table is electrodes else _locations_of(table)
        for u, rows in enumerate(per_unit):
            rows = [int(r) for r in rows if 0 <= int(r) < (len(tlocs) if tlocs is not None else 0)]
            if table is electrodes:
                group_rows[u] += rows
            if tlocs is None or not rows:
                continue
            named = [tlocs[r] for r in rows if parse_region(tlocs[r]) is not None]
            pick = Counter(named).most_common(1)[0][0] if named else tlocs[rows[0]]
            candidates[u].append(("electrodes->location (majority)", pick))
    # 3. units.location
    if "location" in units.colnames:
        for u, v in enumerate(units["location"].data[:]):
            candidates[u].append(("units.location", decode(v)))
    # 4. units.electrode_group -> ElectrodeGroup.location
    if "electrode_group" in units.colnames:
        try:
            groups = list(units["electrode_group"].data[:])
        except (OSError, TypeError, ValueError):
            groups = []
        for u, g in enumerate(groups[:n]):
            candidates[u].append(("units.electrode_group.location", decode(getattr(g, "location", "") or "")))
    # 5. the group of the unit's electrode row
    if any(group_rows):
        group_locs = _group_locations_of(electrodes)
        if group_locs is not None:
            for u, rows in enumerate(group_rows):
                if rows:
                    candidates[u].append(("electrodes.group.location", group_locs[rows[0]]))

    # 6. no link at all: the location every electrode shares
    if locs and not any(candidates):
        distinct = sorted(set(locs))
        if len(distinct) == 1:
            for u in range(n):
                candidates[u].append(("electrodes.location (all electrodes)", distinct[0]))

    raw, source = [], []
    for cands in candidates:
        pick = next(((s, v) for s, v in cands if parse_region(v) is not None), None)
        if pick is None:
            pick = ("none", cands[0][1]) if cands else ("none", "")
        source.append(pick[0])
        raw.append(pick[1])
    return raw, source


def _summarise(items: list[str], k: int = 5) -> str:
    head = ", ".join(items[:k])
    return head + (f", ... ({len(items)} in all)" if len(items) > k else "")


def _spike_index(units: Any, n: int) -> tuple[np.ndarray, Any]:
    """(end offset of each unit's spikes, the lazy spike_times dataset), refused when inconsistent."""
    col = units["spike_times"]
    if _kind(col) != "VectorIndex":
        raise IngestError("units.spike_times has no spike_times_index")
    bounds = np.asarray(col.data[:], dtype=np.int64)
    times_ds = col.target.data
    n_spikes = int(times_ds.shape[0])
    if len(bounds) != n or np.any(np.diff(bounds) < 0) or (n and bounds[-1] > n_spikes):
        raise IngestError(
            f"units.spike_times_index is inconsistent ({len(bounds)} entries for {n} units, "
            f"last {int(bounds[-1]) if len(bounds) else 0} vs {n_spikes} spike times)"
        )
    return bounds, times_ds


def _clean_trains(ids: list[str], bounds: np.ndarray, times_ds: Any, file_warnings: list[str]
                  ) -> list[np.ndarray | None]:
    """Each unit's cleaned spike train (None: no spikes left, the unit is dropped), with one warning per kind."""
    starts = np.r_[0, bounds[:-1]]
    trains: list[np.ndarray | None] = []
    empty, nan_units, unsorted_units = [], [], []
    for u in range(len(ids)):
        a, b = int(starts[u]), int(bounds[u])
        t, n_bad, unsorted = clean_spike_train(times_ds[a:b] if b > a else np.zeros(0))
        if n_bad:
            nan_units.append(f"{ids[u]} ({n_bad})")
        if unsorted:
            unsorted_units.append(ids[u])
        if t.size == 0:
            empty.append(ids[u])
            trains.append(None)
        else:
            trains.append(t)
    if empty:
        file_warnings.append(f"{len(empty)} units without spikes dropped: {_summarise(empty)}")
    if nan_units:
        file_warnings.append(f"non-finite spike times dropped from units {_summarise(nan_units)}")
    if unsorted_units:
        file_warnings.append(f"spike_times not sorted (now sorted) for units {_summarise(unsorted_units)}")
    return trains


def _region_warnings(members: list[int], region: str, raw: list, source: list) -> list[str]:
    """What a region's record says about where its units' regions came from."""
    warns: list[str] = []
    if region == UNKNOWN:
        shown = sorted({repr(raw[u]) for u in members})
        warns.append(f"{len(members)} units have no usable location ({_summarise(shown, 3)}) -> region 'unknown'")
    fallback = Counter(source[u] for u in members if source[u] != "none")
    if set(fallback) - {"peak_channel_id->electrodes.location"}:
        warns.append("unit regions from " + ", ".join(f"{s}: {c}" for s, c in sorted(fallback.items())))
    return warns


def ephys_records(nwb: Any, session_id: str, source_file: str, subject: str, stimuli: list,
                  file_warnings: list[str]) -> list[SessionRecord]:
    """One record per region of the file's Units table ([] when it has none or no spikes)."""
    units = nwb.units
    if units is None or "spike_times" not in units.colnames:
        return []
    n = len(units.id)
    if n == 0:
        return []
    bounds, times_ds = _spike_index(units, n)
    ids, dup_warns = unique_ids([decode(v) for v in units.id.data[:]])
    file_warnings += dup_warns
    raw, source = unit_locations(nwb, units, n)
    meta = scalar_columns(units, n, exclude=NON_META_COLUMNS)
    meta["location_raw"] = raw
    meta["region_source"] = source
    regions = [region_name(v) for v in raw]
    trains = _clean_trains(ids, bounds, times_ds, file_warnings)
    if all(t is None for t in trains):
        return []

    records = []
    for region in sorted({regions[u] for u in range(n) if trains[u] is not None}):
        members = [u for u in range(n) if trains[u] is not None and regions[u] == region]
        warns = _region_warnings(members, region, raw, source)
        times = np.concatenate([trains[u] for u in members])  # type: ignore[misc]
        which = np.concatenate([np.full(len(trains[u]), k, dtype=np.int32) for k, u in enumerate(members)])  # type: ignore[arg-type]
        order = np.argsort(times, kind="stable")
        times, which = times[order], which[order]
        records.append(
            SessionRecord(
                session_id=session_id,
                modality="ephys",
                region=region,
                subject=subject,
                source_file=source_file,
                unit_ids=[ids[u] for u in members],
                t_start=float(times[0]),
                t_end=float(times[-1]),
                stimuli=list(stimuli),
                spike_times=times,
                spike_units=which,
                unit_meta={k: [v[u] for u in members] for k, v in meta.items()},
                warnings=warns + list(file_warnings),
            )
        )
    return records
