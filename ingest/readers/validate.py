"""Validation shared by the readers: spike trains, unit ids, frame times, placeholder arrays, stop times.

Each function either returns a repaired value plus human-readable warnings, or raises
``IngestError`` with a one-line reason when the data cannot be trusted at all.

Decisions (the same in every reader):

- Spike times: NaN/inf spikes are dropped, an unsorted train is sorted (the NWB says the
  times, not their order), a unit left without spikes is dropped by the caller.
- Frame times: NaN frames and repeated timestamps are dropped (a row subset, read lazily by
  :class:`ingest.records.RowSubsetTrace`); any *decrease* is an error, because re-ordering rows of a dF/F
  dataset lazily would mean a random read per frame, and a decreasing clock usually means
  concatenated or corrupt series that no sort makes right.
- Stop times: a NaN stop becomes the next presentation's start (rows sorted by start), the
  last one gets the median known duration; a stop before its start becomes the start.
"""

from __future__ import annotations

import numpy as np

from ingest.records import IngestError


def clean_spike_train(times: np.ndarray) -> tuple[np.ndarray, int, bool]:
    """(float64 sorted finite times, number of non-finite spikes dropped, whether it was unsorted)."""
    t = np.asarray(times, dtype=np.float64).ravel()
    finite = np.isfinite(t)
    n_bad = int(t.size - finite.sum())
    if n_bad:
        t = t[finite]
    unsorted = bool(t.size > 1 and np.any(np.diff(t) < 0))
    if unsorted:
        t = np.sort(t, kind="stable")
    return t, n_bad, unsorted


def unique_ids(ids: list[str]) -> tuple[list[str], list[str]]:
    """Make local unit ids unique by suffixing repeats with ``_dup<k>``; returns (ids, warnings)."""
    seen: set[str] = set(ids)
    counts: dict[str, int] = {}
    out, warns = [], []
    first: set[str] = set()
    for uid in ids:
        if uid not in first:
            first.add(uid)
            out.append(uid)
            continue
        k = counts.get(uid, 0)
        new = uid
        while new in seen:
            k += 1
            new = f"{uid}_dup{k}"
        counts[uid] = k
        seen.add(new)
        out.append(new)
        warns.append(f"duplicated unit id {uid!r} renamed {new!r}")
    return out, warns


def check_length(what: str, n_have: int, n_expected: int, expected_what: str) -> None:
    """Raise when a dataset holds fewer values than its metadata declares (placeholders, truncation)."""
    if n_have < n_expected:
        raise IngestError(
            f"{what} holds {n_have} values but {expected_what} is {n_expected} "
            f"(placeholder or truncated data)"
        )


def frame_rows(ts: np.ndarray, series: str) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Frame times made strictly increasing: (times, rows kept or None when all, warnings).

    Drops non-finite times and repeated times (keeps the first frame of a repeat);
    raises IngestError on any decrease.
    """
    t = np.asarray(ts, dtype=np.float64).ravel()
    warns: list[str] = []
    keep = np.isfinite(t)
    n_nan = int(t.size - keep.sum())
    idx = np.nonzero(keep)[0]
    tf = t[idx]
    d = np.diff(tf)
    if np.any(d < 0):
        first = int(idx[int(np.argmax(d < 0)) + 1])
        raise IngestError(
            f"non-monotonic timestamps in {series}: {int((d < 0).sum())} decreases, first at frame {first}"
        )
    dup = np.r_[False, d == 0]
    n_dup = int(dup.sum())
    if n_nan:
        warns.append(f"{series}: {n_nan} frames with non-finite timestamps dropped")
    if n_dup:
        warns.append(f"{series}: {n_dup} frames with repeated timestamps dropped")
    if not n_nan and not n_dup:
        return t, None, warns
    rows = idx[~dup]
    return t[rows], rows, warns


def orient_trace(data: object, ts: np.ndarray, what: str, units_first_expected: bool
                 ) -> tuple[bool, int, np.ndarray, np.ndarray | None, list[str]]:
    """Check a dF/F array against its timestamps, whichever way round it is stored.

    Returns (units_first, n_units, frame_times, rows, warnings); raises IngestError for
    placeholder/truncated data, no frames, no ROIs or an all-NaN trace. The expected
    orientation (NWB 1 Allen: ROIs x frames; NWB 2: frames x ROIs) wins when both fit.
    """
    shape = tuple(getattr(data, "shape", ()))
    if len(shape) != 2:
        raise IngestError(f"{what}: data has shape {shape}, expected 2-D")
    n_ts = len(ts)
    if n_ts == 0:
        raise IngestError(f"{what}: no frames")
    warns: list[str] = []
    t_axis = 1 if units_first_expected else 0
    if shape[t_axis] == n_ts or (shape[t_axis] > n_ts and shape[1 - t_axis] != n_ts):
        units_first = units_first_expected
        if shape[t_axis] > n_ts:
            warns.append(f"{what}: data has {shape[t_axis]} frames but {n_ts} timestamps; extra frames ignored")
    elif shape[1 - t_axis] >= n_ts:
        units_first = not units_first_expected
        warns.append(f"{what}: data stored {'ROIs x frames' if units_first else 'frames x ROIs'} {shape}, "
                     f"not the usual layout; read accordingly")
    else:
        raise IngestError(f"{what}: data has shape {shape} but timestamps holds {n_ts} frames "
                          f"(placeholder or truncated data)")
    n_units = shape[0] if units_first else shape[1]
    if n_units == 0:
        raise IngestError(f"{what}: no ROIs")
    if not has_finite(data, units_first, n_ts):
        raise IngestError(f"{what}: dF/F is all NaN")
    frame_times, rows, w = frame_rows(ts, what)
    return units_first, n_units, frame_times, rows, warns + w


def has_finite(data: object, units_first: bool, n_frames: int, block: int = 2048) -> bool:
    """Whether any value of a (lazy) 2-D trace dataset is finite, reading frame blocks until one is."""
    for a in range(0, n_frames, block):
        b = min(n_frames, a + block)
        arr = np.asarray(data[:, a:b] if units_first else data[a:b])  # type: ignore[index]
        if arr.dtype.kind in "iub" and arr.size:
            return True
        if np.isfinite(arr).any():
            return True
    return False


def fill_stop_times(
    start: np.ndarray, stop: np.ndarray | None, what: str, fallback_duration: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(start, stop, order) sorted by start with every stop finite and >= start, plus warnings.

    ``order`` maps the output rows to the input rows (rows with a non-finite start are dropped).
    A NaN stop becomes the next start; the last one (or any whose next start equals its own) gets
    the median of the known durations, else ``fallback_duration`` if given, else the median gap
    between starts, else 0.
    """
    start = np.asarray(start, dtype=np.float64).ravel()
    stop = np.asarray(stop, dtype=np.float64).ravel() if stop is not None else np.full(start.shape, np.nan)
    warns: list[str] = []
    ok = np.isfinite(start)
    if not ok.all():
        warns.append(f"{what}: {int((~ok).sum())} rows with non-finite start_time dropped")
    order = np.nonzero(ok)[0]
    order = order[np.argsort(start[order], kind="stable")]
    s, e = start[order], stop[order].copy()
    bad = ~np.isfinite(e)
    if bad.any():
        known = e[~bad] - s[~bad]
        if known.size:
            dur = float(np.median(known))
        elif fallback_duration is not None:
            dur = float(fallback_duration)
        elif s.size > 1:
            dur = float(np.median(np.diff(s)))
        else:
            dur = 0.0
        nxt = np.r_[s[1:], np.nan]
        fill = np.where(np.isfinite(nxt) & (nxt > s), nxt, s + dur)
        e[bad] = fill[bad]
        warns.append(
            f"{what}: {int(bad.sum())} NaN stop_time replaced by the next start_time "
            f"(last: start + {dur:.3g} s)"
        )
    back = e < s
    if back.any():
        e[back] = s[back]
        warns.append(f"{what}: {int(back.sum())} stop_time before start_time set to start_time")
    return s, e, order, warns
