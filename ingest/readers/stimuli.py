"""Stimulus presentation tables -> :class:`Intervals` with class labels for the three tasks.

Where each layout keeps its presentations (see the NWB layout notes):

- Allen Neuropixels (NWB 2): ``/intervals/<task>_presentations`` TimeIntervals; label column
  ``orientation`` (gratings; NaN = blank) or ``frame`` (natural scenes; -1 = blank). Columns that
  mixed numbers and NaN were written as strings with ``'N/A'``: everything is coerced to float.
- DANDI 000728 (NWB 2 conversions of the 2P files): ``/stimulus/presentation/static_gratings`` and
  ``drifting_gratings`` TimeIntervals (``orientation_in_degrees``, ``is_blank_sweep``) and the
  IndexSeries ``natural_scenes_stimulus`` (image index; an index past the last image, e.g.
  2**32-1, is a blank; 0.25 s each).
- Allen NWB 1 2P files: ``stimulus/presentation/<task>_stimulus`` with ``data`` (columns named
  by ``features``) and ``frame_duration`` = [start, end] indices into the dF/F frame times.

Labels come from :func:`shards.schema.labels_for` only. Presentations whose label is
UNLABELLED are dropped (grating blanks, values outside the class list); natural-scene blanks
have their own class and stay. Files with none of the three tasks get their ``trials`` and
other ``/intervals`` tables as task ``GENERIC_TASK`` with label -1, except ``epochs``,
``invalid_times`` and ``spontaneous*`` tables: those are not events but stretches of minutes up to
the whole recording, and the split assignment (``ingest.splits``) snaps every block edge that
falls inside an interval to its ends, which would put such a stretch (or the whole session) in
one split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from ingest.readers.validate import fill_stop_times
from ingest.records import Intervals
from ingest.regions import decode
from shards.schema import DRIFTING_GRATINGS, GENERIC_TASK, NATURAL_SCENES, STATIC_GRATINGS, UNLABELLED, Task, labels_for

#: Presentation length when a file gives only onsets (the Allen stimulus design).
NOMINAL_DURATION_S = {STATIC_GRATINGS.name: 0.25, DRIFTING_GRATINGS.name: 2.0, NATURAL_SCENES.name: 0.25}
#: Interval tables never used as generic event windows (names, and name prefixes).
GENERIC_EXCLUDE = {"epochs", "invalid_times"}
GENERIC_EXCLUDE_PREFIXES = ("spontaneous",)

_TABLE_NAMES = {
    STATIC_GRATINGS.name: ("static_gratings_presentations", "static_gratings"),
    DRIFTING_GRATINGS.name: ("drifting_gratings_presentations", "drifting_gratings"),
    NATURAL_SCENES.name: ("natural_scenes_presentations", "natural_scenes"),
}
_VALUE_COLUMNS = {
    STATIC_GRATINGS.name: ("orientation", "orientation_in_degrees"),
    DRIFTING_GRATINGS.name: ("orientation", "orientation_in_degrees"),
    NATURAL_SCENES.name: ("frame", "image_index", "natural_scene_index"),
}
_BLANK_COLUMNS = ("is_blank_sweep", "blank_sweep")
_INDEX_SERIES_NAMES = ("natural_scenes_stimulus", "natural_scenes")
_NWB1_FEATURES = {  # Allen's column order, used when ``features`` is missing or unreadable
    STATIC_GRATINGS.name: ["orientation", "spatial_frequency", "phase"],
    DRIFTING_GRATINGS.name: ["temporal_frequency", "orientation", "blank_sweep"],
}
TASK_ORDER = (STATIC_GRATINGS, DRIFTING_GRATINGS, NATURAL_SCENES)


def to_float(values: Any) -> np.ndarray:
    """Numbers as float64; strings ('N/A', '[250.0, 250.0]', bytes) coerced, unparsable -> NaN."""
    arr = np.asarray(values)
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float64).ravel()
    text = pd.Series([decode(v) for v in arr.ravel()], dtype=object)
    return pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)


def _truthy(values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind in "fiub":
        return np.nan_to_num(arr.astype(np.float64).ravel()) != 0
    return np.asarray([decode(v).lower() in {"true", "1", "1.0", "yes"} for v in arr.ravel()], dtype=bool)


def make_intervals(
    task: Task,
    start: np.ndarray,
    stop: np.ndarray | None,
    values: np.ndarray,
    what: str,
    warns: list[str],
) -> Intervals | None:
    """Labelled, sorted Intervals of one task's presentations (UNLABELLED ones dropped)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    s, e, order, w = fill_stop_times(start, stop, what, fallback_duration=NOMINAL_DURATION_S.get(task.name))
    warns += w
    v = values[order]
    labels = labels_for(task, v)
    odd = (labels == UNLABELLED) & np.isfinite(v)
    if task.name == NATURAL_SCENES.name:
        odd[:] = False  # every non-image value is a blank there
    if odd.any():
        shown = ", ".join(f"{x:g}" for x in np.unique(v[odd])[:5])
        warns.append(f"{what}: {int(odd.sum())} presentations with values outside the {task.name} classes dropped ({shown})")
    keep = labels != UNLABELLED
    if not keep.any():
        warns.append(f"{what}: no labelled presentation")
        return None
    return Intervals(task.name, s[keep], e[keep], labels[keep])


def merge(intervals: list[Intervals]) -> list[Intervals]:
    """One Intervals per task, sorted by start (stable), tasks in a fixed order."""
    by_task: dict[str, list[Intervals]] = {}
    for iv in intervals:
        by_task.setdefault(iv.task, []).append(iv)
    out = []
    order = [t.name for t in TASK_ORDER] + sorted(set(by_task) - {t.name for t in TASK_ORDER})
    for name in order:
        parts = by_task.get(name)
        if not parts:
            continue
        s = np.concatenate([p.start for p in parts])
        e = np.concatenate([p.end for p in parts])
        lab = np.concatenate([p.label for p in parts])
        o = np.argsort(s, kind="stable")
        out.append(Intervals(name, s[o], e[o], lab[o]))
    return out


# ---- NWB 2 (pynwb objects) ----------------------------------------------------------------------
def _column(table: Any, name: str) -> np.ndarray | None:
    if name not in table.colnames and name not in ("start_time", "stop_time"):
        return None
    try:
        col = table[name]
    except (KeyError, ValueError):
        return None
    data = getattr(col, "data", None)
    if data is None or type(col).__name__ in ("VectorIndex", "DynamicTableRegion"):
        return None
    arr = np.asarray(data[:])
    return arr if arr.ndim == 1 else None


def _table_intervals(task: Task, table: Any, what: str, warns: list[str]) -> Intervals | None:
    start = _column(table, "start_time")
    if start is None or len(start) == 0:
        return None
    stop = _column(table, "stop_time")
    raw = next((c for c in (_column(table, n) for n in _VALUE_COLUMNS[task.name]) if c is not None), None)
    if raw is None:
        warns.append(f"{what}: no {'/'.join(_VALUE_COLUMNS[task.name])} column; table skipped")
        return None
    values = to_float(raw)
    for name in _BLANK_COLUMNS:
        blank = _column(table, name)
        if blank is not None and len(blank) == len(values):
            values[_truthy(blank)] = np.nan if task.name != NATURAL_SCENES.name else -1.0
    if len(values) != len(start):
        warns.append(f"{what}: label column length {len(values)} != {len(start)} rows; table skipped")
        return None
    return make_intervals(task, to_float(start), None if stop is None else to_float(stop), values, what, warns)


def _series_times(series: Any) -> np.ndarray:
    n = int(series.data.shape[0])
    if series.timestamps is not None:
        return np.asarray(series.timestamps[:], dtype=np.float64)
    rate = float(series.rate)
    t0 = float(series.starting_time or 0.0)
    return t0 + np.arange(n, dtype=np.float64) / rate


def _n_images(series: Any) -> int:
    images = getattr(series, "indexed_images", None)
    if images is not None and getattr(images, "images", None) is not None:
        return len(images.images)
    indexed = getattr(series, "indexed_timeseries", None)
    if indexed is not None and getattr(indexed, "data", None) is not None:
        return int(indexed.data.shape[0])
    return len(NATURAL_SCENES.values)


def _index_series_intervals(series: Any, what: str, warns: list[str]) -> Intervals | None:
    idx = to_float(series.data[:])
    start = _series_times(series)
    if len(start) != len(idx):
        warns.append(f"{what}: {len(idx)} indices but {len(start)} timestamps; skipped")
        return None
    n_img = _n_images(series)
    idx[(idx >= n_img) | (idx < 0)] = -1.0  # NWB1's -1 blank arrives as 2**32-1 in the conversions
    dur = NOMINAL_DURATION_S[NATURAL_SCENES.name]
    order = np.argsort(start, kind="stable")
    nxt = np.full(len(start), np.inf)
    nxt[order[:-1]] = start[order[1:]]
    stop = np.where(nxt > start, np.minimum(start + dur, nxt), start + dur)
    return make_intervals(NATURAL_SCENES, start, stop, idx, what, warns)


def nwb2_intervals(nwb: Any, warns: list[str]) -> list[Intervals]:
    """Labelled intervals of the three tasks from an NWBFile; generic ones if it has none."""
    from hdmf.common import DynamicTable
    from pynwb.base import TimeSeries

    groups = {"intervals": dict(nwb.intervals or {}), "stimulus": dict(nwb.stimulus or {})}
    found: list[Intervals] = []
    used: set[str] = set()
    for task in TASK_ORDER:
        for where, objs in groups.items():
            for name in _TABLE_NAMES[task.name]:
                obj = objs.get(name)
                if isinstance(obj, DynamicTable):
                    iv = _table_intervals(task, obj, f"/{where}/{name}", warns)
                    used.add(name)
                    if iv is not None:
                        found.append(iv)
        if task is NATURAL_SCENES:
            for name in _INDEX_SERIES_NAMES:
                obj = groups["stimulus"].get(name)
                if isinstance(obj, TimeSeries) and not isinstance(obj, DynamicTable):
                    iv = _index_series_intervals(obj, f"/stimulus/presentation/{name}", warns)
                    if iv is not None:
                        found.append(iv)
    if found:
        return merge(found)
    return merge(generic_intervals(nwb, warns, skip=used))


def generic_intervals(nwb: Any, warns: list[str], skip: set[str] = frozenset()) -> list[Intervals]:
    """``trials`` and other ``/intervals`` tables as unlabelled event windows (task GENERIC_TASK)."""
    out = []
    for name, table in sorted(dict(nwb.intervals or {}).items()):
        if name in GENERIC_EXCLUDE or name in skip or name.startswith(GENERIC_EXCLUDE_PREFIXES):
            continue
        start = _column(table, "start_time")
        if start is None or len(start) == 0:
            continue
        stop = _column(table, "stop_time")
        s, e, _, w = fill_stop_times(to_float(start), None if stop is None else to_float(stop), f"/intervals/{name}")
        warns += w
        if len(s):
            out.append(Intervals(GENERIC_TASK, s, e, np.full(len(s), UNLABELLED)))
    return out


# ---- NWB 1 Allen (h5py) -------------------------------------------------------------------------
def _nwb1_features(group: Any, task: Task, n_cols: int) -> list[str]:
    if "features" in group:
        try:
            names = [decode(v) for v in np.asarray(group["features"][()]).ravel()]
            if len(names) == n_cols:
                return names
        except (OSError, TypeError, ValueError):
            pass
    return _NWB1_FEATURES.get(task.name, [])


def _nwb1_times(group: Any, n: int, frame_times: np.ndarray, task: Task, what: str,
                warns: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Start/end from ``frame_duration`` (frame indices into the dF/F times), else onsets + nominal length."""
    if "frame_duration" in group:
        fd = np.asarray(group["frame_duration"][()])
        if fd.ndim == 2 and fd.shape == (n, 2) and np.isfinite(fd).all():
            fi = np.rint(fd).astype(np.int64)
            if fi.min() >= 0 and fi.max() < len(frame_times) and np.all(fi[:, 1] >= fi[:, 0]):
                return frame_times[fi[:, 0]], frame_times[fi[:, 1]]
        warns.append(f"{what}: frame_duration does not index the dF/F frames; using timestamps")
    if "timestamps" in group:
        ts = np.asarray(group["timestamps"][()], dtype=np.float64).ravel()
        if len(ts) == n:
            return ts, ts + NOMINAL_DURATION_S[task.name]
    warns.append(f"{what}: no usable presentation times; skipped")
    return None


def nwb1_intervals(f: Any, frame_times: np.ndarray, warns: list[str]) -> list[Intervals]:
    """Labelled intervals of the three tasks from an Allen NWB 1 file (h5py.File)."""
    pres = f.get("stimulus/presentation")
    if pres is None:
        return []
    found = []
    for task in TASK_ORDER:
        name = f"{task.name}_stimulus"
        if name not in pres:
            continue
        g, what = pres[name], f"stimulus/presentation/{name}"
        if "data" not in g:
            warns.append(f"{what}: no data; skipped")
            continue
        data = g["data"]
        n = int(data.shape[0]) if data.ndim else 0
        declared = int(np.asarray(g["num_samples"][()]).ravel()[0]) if "num_samples" in g else n
        if n < declared or n == 0:
            warns.append(f"{what}: data holds {n} rows but num_samples is {declared} (placeholder); skipped")
            continue
        arr = np.asarray(data[()])
        if task is NATURAL_SCENES:
            values = to_float(arr[:, 0] if arr.ndim == 2 else arr)
        else:
            if arr.ndim != 2:
                warns.append(f"{what}: data is not a table (shape {arr.shape}); skipped")
                continue
            cols = _nwb1_features(g, task, arr.shape[1])
            if "orientation" not in cols:
                warns.append(f"{what}: no orientation feature in {cols}; skipped")
                continue
            values = to_float(arr[:, cols.index("orientation")])
            if "blank_sweep" in cols:
                values[_truthy(arr[:, cols.index("blank_sweep")])] = np.nan
        times = _nwb1_times(g, n, frame_times, task, what, warns)
        if times is None:
            continue
        iv = make_intervals(task, times[0], times[1], values, what, warns)
        if iv is not None:
            found.append(iv)
    return merge(found)
