"""OPhys from an NWB 2 file: the RoiResponseSeries of one imaging plane -> one :class:`SessionRecord`.

The series is looked for in every processing module: under a ``DfOverF`` container first
(``DfOverFEvents``-like series skipped), else under ``Fluorescence`` (with a warning, the
values are not dF/F). The trace stays in the file: the record's ``trace`` is an ArrayTrace
over the h5py dataset, valid while the file is open. Region = the imaging plane's
``location`` (via ``rrs.rois.table.imaging_plane``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ingest.readers.nwb2_ephys import scalar_columns
from ingest.readers.plane import plane_record
from ingest.readers.validate import orient_trace, unique_ids
from ingest.records import IngestError, SessionRecord
from ingest.regions import decode

ROI_NON_META_COLUMNS = {"pixel_mask", "image_mask", "voxel_mask"}


def _rank(name: str) -> tuple[int, str]:
    """Corrected traces first, then plain ones, then events / neuropil / demixed / raw."""
    low = name.lower()
    if "corrected" in low:
        return 0, name
    return (2 if any(k in low for k in ("event", "neuropil", "demix", "raw")) else 1), name


def find_series(nwb: Any) -> tuple[str, Any, list[str]] | None:
    """(path, RoiResponseSeries, warnings) of the series to read, or None when the file has none."""
    from pynwb.ophys import DfOverF, Fluorescence, RoiResponseSeries

    dff, fluo = [], []
    for mod_name, module in sorted((nwb.processing or {}).items()):
        for name, iface in sorted(module.data_interfaces.items()):
            if isinstance(iface, (DfOverF, Fluorescence)):
                bucket = dff if isinstance(iface, DfOverF) else fluo
                for s_name, series in sorted(iface.roi_response_series.items()):
                    if isinstance(series, RoiResponseSeries):
                        bucket.append((f"/processing/{mod_name}/{name}/{s_name}", series))
    warns: list[str] = []
    for bucket, kind in ((dff, "DfOverF"), (fluo, "Fluorescence")):
        usable = [x for x in bucket if "event" not in x[0].rsplit("/", 1)[-1].lower()] or bucket
        if not usable:
            continue
        usable.sort(key=lambda x: _rank(x[0].rsplit("/", 1)[-1]))
        path, series = usable[0]
        if kind == "Fluorescence":
            warns.append(f"no DfOverF; using Fluorescence {series.name} (not dF/F)")
        others = [p for p, _ in usable[1:]]
        if others:
            warns.append(f"using {path}; other {kind} series ignored: {', '.join(others)}")
        return path, series, warns
    return None


def series_times(series: Any, n_frames: int) -> np.ndarray:
    """Explicit timestamps, or starting_time + arange(n)/rate."""
    if series.timestamps is not None:
        return np.asarray(series.timestamps[:], dtype=np.float64).ravel()
    if series.rate is None or not float(series.rate) > 0:
        raise IngestError(f"{series.name}: neither timestamps nor a positive rate")
    t0 = float(series.starting_time or 0.0)
    return t0 + np.arange(n_frames, dtype=np.float64) / float(series.rate)


def _plane_location(series: Any, nwb: Any, warns: list[str]) -> str:
    rois = getattr(series, "rois", None)
    table = getattr(rois, "table", None)
    plane = getattr(table, "imaging_plane", None)
    if plane is None:
        planes = list((nwb.imaging_planes or {}).values())
        if len(planes) == 1:
            plane = planes[0]
    if plane is None:
        warns.append("no imaging plane for the ROI table -> region 'unknown'")
        return ""
    return decode(plane.location or "")


def ophys_record(nwb: Any, session_id: str, source_file: str, subject: str, stimuli: list,
                 file_warnings: list[str]) -> SessionRecord | None:
    """The record of the file's dF/F (or Fluorescence) series, None when it has none."""
    found = find_series(nwb)
    if found is None:
        return None
    path, series, warns = found
    data = series.data
    ts = series_times(series, tuple(getattr(data, "shape", (0,)))[0])
    units_first, n_units, frame_times, rows, w = orient_trace(data, ts, path, units_first_expected=False)
    warns += w

    ids = [str(i) for i in range(n_units)]
    meta: dict[str, list] = {}
    rois = getattr(series, "rois", None)
    if rois is not None and getattr(rois, "table", None) is not None:
        roi_rows = np.asarray(rois.data[:], dtype=np.int64).ravel()
        table = rois.table
        table_ids = np.asarray(table.id.data[:])
        if len(roi_rows) == n_units and (roi_rows.size == 0 or (roi_rows.min() >= 0 and roi_rows.max() < len(table_ids))):
            ids = [decode(v) for v in table_ids[roi_rows]]
            meta = scalar_columns(table, len(table_ids), rows=roi_rows, exclude=ROI_NON_META_COLUMNS)
        else:
            warns.append(f"{path}: rois reference {len(roi_rows)} rows for {n_units} ROI columns; ids are column numbers")
    ids, dup = unique_ids(ids)
    warns += dup
    raw = _plane_location(series, nwb, warns)
    return plane_record(session_id=session_id, subject=subject, source_file=source_file, ids=ids, meta=meta,
                        frame_times=frame_times, data=data, units_first=units_first, rows=rows, raw_location=raw,
                        stimuli=list(stimuli), warns=warns + list(file_warnings))
