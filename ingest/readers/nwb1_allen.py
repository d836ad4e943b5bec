"""Allen Brain Observatory 2P experiments in NWB 1.0.5, read with h5py (pynwb cannot open NWB 1).

Paths (see the NWB layout notes, 3a(i)): dF/F in
``processing/brain_observatory_pipeline/DfOverF/imaging_plane_1/{data,timestamps,num_samples}``,
stored **ROIs x frames**; ROI ids in ``ImageSegmentation/roi_ids`` (the same ids the NWB 2
conversions use as PlaneSegmentation ids) and ``cell_specimen_ids`` (their ``global_roi_id``);
region from ``general/optophysiology/imaging_plane_1/location`` or ``general/targeted_structure``.
All strings are fixed-length bytes. Released skeletons keep ``num_samples`` but replace arrays by
1-element placeholders: a dataset shorter than what it declares is an IngestError naming both.
"""

from __future__ import annotations

import h5py
import numpy as np

from ingest.readers.plane import plane_record
from ingest.readers.sniff import ALLEN_NWB1_MODULE
from ingest.readers.stimuli import nwb1_intervals
from ingest.readers.validate import check_length, orient_trace, unique_ids
from ingest.records import IngestError, SessionRecord
from ingest.regions import decode


def _text(f: h5py.File, path: str) -> str:
    obj = f.get(path)
    if not isinstance(obj, h5py.Dataset):
        return ""
    try:
        value = obj[()]
    except (OSError, TypeError, ValueError):
        return ""
    arr = np.asarray(value)
    if arr.ndim:
        value = arr.ravel()[0] if arr.size else ""
    return decode(value)


def _int(ds: h5py.Dataset) -> int:
    return int(np.asarray(ds[()]).ravel()[0])


def _pick_series(module: h5py.Group, warns: list[str]) -> tuple[str, h5py.Group]:
    for container in ("DfOverF", "Fluorescence"):
        group = module.get(container)
        if not isinstance(group, h5py.Group):
            continue
        names = sorted(k for k in group if isinstance(group[k], h5py.Group) and "data" in group[k])
        names = [k for k in names if not any(w in k for w in ("neuropil", "demixed"))] or names
        if not names:
            continue
        name = "imaging_plane_1" if "imaging_plane_1" in names else names[0]
        if container == "Fluorescence":
            warns.append(f"no DfOverF; using Fluorescence {name} (not dF/F)")
        return f"{ALLEN_NWB1_MODULE}/{container}/{name}", group[name]
    raise IngestError(f"no DfOverF or Fluorescence traces under {ALLEN_NWB1_MODULE}")


def _frame_times(g: h5py.Group, what: str, n_frames_hint: int) -> np.ndarray:
    if "timestamps" in g:
        return np.asarray(g["timestamps"][()], dtype=np.float64).ravel()
    if "starting_time" in g:
        st = g["starting_time"]
        rate = float(decode(st.attrs.get("rate", 0)) or 0)
        if rate > 0:
            return float(np.asarray(st[()]).ravel()[0]) + np.arange(n_frames_hint) / rate
    raise IngestError(f"{what}: neither timestamps nor starting_time with a rate")


def _roi_ids(f: h5py.File, series: h5py.Group, n_units: int, warns: list[str]) -> tuple[list[str], dict[str, list]]:
    seg = f.get(f"{ALLEN_NWB1_MODULE}/ImageSegmentation")
    meta: dict[str, list] = {}
    ids: list[str] | None = None
    if isinstance(seg, h5py.Group) and "roi_ids" in seg and seg["roi_ids"].shape == (n_units,):
        ids = [decode(v) for v in seg["roi_ids"][()]]
    if "roi_names" in series and series["roi_names"].shape == (n_units,):
        names = [decode(v) for v in series["roi_names"][()]]
        meta["roi_name"] = names
        ids = ids or names
    if isinstance(seg, h5py.Group) and "cell_specimen_ids" in seg and seg["cell_specimen_ids"].shape == (n_units,):
        meta["global_roi_id"] = [int(v) for v in seg["cell_specimen_ids"][()]]
    if ids is None:
        warns.append("no ROI ids matching the dF/F rows; ids are row numbers")
        ids = [str(i) for i in range(n_units)]
    return ids, meta


def read_records(f: h5py.File, session_id: str, source_file: str) -> list[SessionRecord]:
    """The one OPhys record of an Allen NWB 1 file (its trace reads from ``f``, which must stay open)."""
    warns: list[str] = []
    module = f[ALLEN_NWB1_MODULE]
    what, g = _pick_series(module, warns)
    if "data" not in g:
        raise IngestError(f"{what}: no data")
    data = g["data"]
    declared = _int(g["num_samples"]) if "num_samples" in g else None
    ts = _frame_times(g, what, declared if declared is not None else max(data.shape or (0,)))
    n_ts = len(ts)
    if declared is not None:
        check_length(f"{what}/timestamps", n_ts, declared, f"{what}/num_samples")
    units_first, n_units, frame_times, rows, w = orient_trace(data, ts, f"{what}/data", units_first_expected=True)
    warns += w

    ids, meta = _roi_ids(f, g, n_units, warns)
    ids, dup = unique_ids(ids)
    warns += dup
    plane = g.name.rsplit("/", 1)[-1]
    raw = (_text(f, f"general/optophysiology/{plane}/location")
           or _text(f, "general/optophysiology/imaging_plane_1/location")
           or _text(f, "general/targeted_structure"))
    if not raw:
        warns.append("no imaging plane location or targeted structure -> region 'unknown'")
    subject = _text(f, "general/subject/subject_id") or _text(f, "general/specimen_name")

    stimuli = nwb1_intervals(f, ts, warns)
    return [plane_record(session_id=session_id, subject=subject, source_file=source_file, ids=ids, meta=meta,
                         frame_times=frame_times, data=data, units_first=units_first, rows=rows, raw_location=raw,
                         stimuli=stimuli, warns=warns)]
