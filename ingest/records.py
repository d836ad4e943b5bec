"""What a reader hands to the shard writer: one modality, one region, one session.

A record owns no file handle itself; its trace source may (OPhys), which is why
readers yield records inside a context manager (``readers.open_records``) and
the writer consumes them before the file closes. Nothing here loads a whole
file: spike arrays are per region, dF/F is read in frame slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

Modality = Literal["ephys", "ophys"]


@dataclass
class Intervals:
    """Stimulus presentations of one task: start/end in seconds and a class label (-1: none)."""

    task: str
    start: np.ndarray  # float64 (n,)
    end: np.ndarray  # float64 (n,), always >= start and finite
    label: np.ndarray  # int64 (n,)

    def __post_init__(self) -> None:
        self.start = np.asarray(self.start, dtype=np.float64)
        self.end = np.asarray(self.end, dtype=np.float64)
        self.label = np.asarray(self.label, dtype=np.int64)
        if not (len(self.start) == len(self.end) == len(self.label)):
            raise ValueError(f"task {self.task}: start/end/label lengths differ")


class TraceSource(Protocol):
    """dF/F of one imaging plane, read lazily in frame slices.

    ``read(i0, i1)`` returns float32 of shape (i1 - i0, n_units), time first, whatever the
    file's own orientation (NWB1 Allen stores ROIs x frames).
    """

    frame_times: np.ndarray  # float64 (n_frames,), strictly increasing

    @property
    def n_units(self) -> int: ...

    def read(self, i0: int, i1: int) -> np.ndarray: ...


@dataclass
class ArrayTrace:
    """A TraceSource over an in-memory or h5py array, with optional transposition."""

    frame_times: np.ndarray
    data: object  # array-like (n_frames, n_units), or (n_units, n_frames) with units_first
    units_first: bool = False
    columns: np.ndarray | None = None  # subset of unit columns to keep

    @property
    def n_units(self) -> int:
        if self.columns is not None:
            return len(self.columns)
        shape = self.data.shape  # type: ignore[attr-defined]
        return int(shape[0] if self.units_first else shape[1])

    def read(self, i0: int, i1: int) -> np.ndarray:
        if self.units_first:
            block = np.asarray(self.data[:, i0:i1], dtype=np.float32).T  # type: ignore[index]
        else:
            block = np.asarray(self.data[i0:i1], dtype=np.float32)  # type: ignore[index]
        if block.ndim == 1:
            block = block[:, None]
        if self.columns is not None:
            block = block[:, self.columns]
        return np.ascontiguousarray(block)


@dataclass
class RowSubsetTrace(ArrayTrace):
    """An :class:`ArrayTrace` that shows only some frames (file rows ``rows``, sorted) of the data.

    ``read(i0, i1)`` reads the file rows ``rows[i0]..rows[i1-1]`` in one slice and keeps the wanted ones.
    """

    rows: np.ndarray | None = None

    def read(self, i0: int, i1: int) -> np.ndarray:
        if self.rows is None:
            return super().read(i0, i1)
        sel = np.asarray(self.rows[i0:i1])
        if sel.size == 0:
            return np.zeros((0, self.n_units), dtype=np.float32)
        r0, r1 = int(sel[0]), int(sel[-1]) + 1
        block = super().read(r0, r1)
        return np.ascontiguousarray(block[sel - r0])


def make_trace(frame_times: np.ndarray, data: object, units_first: bool, rows: np.ndarray | None) -> ArrayTrace:
    """The plain ArrayTrace when every frame is kept, the row-subset one otherwise."""
    if rows is None:
        return ArrayTrace(frame_times=frame_times, data=data, units_first=units_first)
    return RowSubsetTrace(frame_times=frame_times, data=data, units_first=units_first, rows=rows)


@dataclass
class SessionRecord:
    """One modality x one region of one recording session.

    ``unit_ids`` are local ids (strings); the global id is ``f"{session_id}/{local}"``.
    EPhys: ``spike_times`` (float64, sorted) and ``spike_units`` (int32 index into unit_ids).
    OPhys: ``trace`` (TraceSource), columns in unit_ids order.
    ``unit_meta`` holds per-unit columns as the NWB states them (numbers or strings).
    """

    session_id: str
    modality: Modality
    region: str
    subject: str
    source_file: str
    unit_ids: list[str]
    t_start: float
    t_end: float
    stimuli: list[Intervals] = field(default_factory=list)
    spike_times: np.ndarray | None = None
    spike_units: np.ndarray | None = None
    trace: TraceSource | None = None
    unit_meta: dict[str, list] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return float(self.t_end - self.t_start)

    @property
    def tasks(self) -> list[str]:
        return sorted({iv.task for iv in self.stimuli})


class IngestError(Exception):
    """A file that cannot be ingested; the message is the one-line reason shown to the user."""
