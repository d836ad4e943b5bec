"""NWB file -> list[SessionRecord].

    from ingest.readers import open_records
    with open_records(path, session_id) as records:   # list[SessionRecord]
        ...  # valid only inside the block: OPhys traces read lazily from the open file

The layout is sniffed with h5py first (:mod:`.sniff`): Allen NWB 1 files are read with h5py
(:mod:`.nwb1_allen`), NWB 2 files with pynwb, giving one EPhys record per region of the Units
table (:mod:`.nwb2_ephys`) and/or one OPhys record for the imaging plane (:mod:`.nwb2_ophys`);
stimulus tables become labelled Intervals (:mod:`.stimuli`). Files that cannot be ingested raise
:class:`ingest.records.IngestError` with a one-line reason; problems that can be handled become
strings in ``record.warnings``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ingest.readers import nwb1_allen
from ingest.readers.nwb2_ephys import ephys_records
from ingest.readers.nwb2_ophys import ophys_record
from ingest.readers.sniff import Sniffed, open_h5, sniff, sniff_h5
from ingest.readers.stimuli import nwb2_intervals
from ingest.records import IngestError, SessionRecord
from ingest.regions import decode

__all__ = ["open_records", "sniff", "Sniffed"]

T = TypeVar("T")

#: pynwb/hdmf warnings that real files trigger and that say nothing about the data we read.
_HARMLESS = (
    r".*cached namespace.*",
    r".*'manufacturer' field is deprecated.*",
    r".*[Dd]ata may be transposed.*",
    r".*does not match the length of electrodes.*",
)


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for pattern in _HARMLESS:
            warnings.filterwarnings("ignore", message=pattern)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _guard(fn: Callable[[], T]) -> T:
    """Run a reading step; HDF5 read errors (a file damaged past its header) become IngestError."""
    try:
        return fn()
    except IngestError:
        raise
    except OSError as exc:
        raise IngestError(f"HDF5 read error: {_first_line(exc)}") from exc


def _nwb2_records(nwb: Any, session_id: str, source: str) -> list[SessionRecord]:
    subject = decode(getattr(nwb.subject, "subject_id", None) or "") if nwb.subject is not None else ""
    file_warnings: list[str] = []
    stimuli = nwb2_intervals(nwb, file_warnings)
    records = ephys_records(nwb, session_id, source, subject, stimuli, list(file_warnings))
    rec = ophys_record(nwb, session_id, source, subject, stimuli, list(file_warnings))
    if rec is not None:
        records.append(rec)
    if not records:
        units = nwb.units
        if units is not None and len(units.id) > 0 and "spike_times" in units.colnames:
            raise IngestError(f"no unit has spike times ({len(units.id)} units, all empty) and no ROI traces")
        raise IngestError("no units with spike times and no ROI response series (DfOverF/Fluorescence)")
    return records


@contextmanager
def open_records(path: str | Path, session_id: str) -> Iterator[list[SessionRecord]]:
    """The records of one NWB file, valid inside the with-block (the file stays open until it ends)."""
    source = str(path)
    f = open_h5(path)
    with f:
        info = _guard(lambda: sniff_h5(f))
        if info.layout == "nwb1_allen":
            records = _guard(lambda: nwb1_allen.read_records(f, session_id, source))
            yield records
            return
    import pynwb  # heavy; NWB 2 only

    with _quiet():
        try:
            io = pynwb.NWBHDF5IO(source, "r", load_namespaces=True)
        except OSError as exc:
            raise IngestError(f"cannot open file: {_first_line(exc)}") from exc
    try:
        with _quiet():
            try:
                nwb = io.read()
            except Exception as exc:  # pynwb/hdmf raise many types for malformed files
                raise IngestError(f"pynwb cannot read this NWB {info.version} file: {_first_line(exc)}") from exc
            records = _guard(lambda: _nwb2_records(nwb, session_id, source))
        yield records
    finally:
        io.close()
