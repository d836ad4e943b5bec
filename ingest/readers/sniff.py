"""Decide how to read a file by looking at it with h5py, before pynwb touches it.

pynwb >= 2 cannot open NWB 1 files (their version is a *dataset* ``/nwb_version``, not a root
attribute) and gives unclear errors on truncated or non-HDF5 files, so the layout is decided
here and every unreadable file becomes an :class:`IngestError` with a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py

from ingest.records import IngestError
from ingest.regions import decode

Layout = Literal["nwb2", "nwb1_allen"]
ALLEN_NWB1_MODULE = "processing/brain_observatory_pipeline"


@dataclass(frozen=True)
class Sniffed:
    layout: Layout
    version: str  # as the file states it, e.g. "2.5.0" or "NWB-1.0.5"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def open_h5(path: str | Path) -> h5py.File:
    """h5py.File opened read-only, or IngestError (missing, truncated, corrupt or not HDF5)."""
    p = Path(path)
    if not p.is_file():
        raise IngestError("cannot open file: no such file")
    try:
        return h5py.File(p, "r")
    except OSError as exc:
        raise IngestError(f"cannot open file as HDF5 (truncated, corrupt or not HDF5): {_first_line(exc)}") from None


def sniff_h5(f: h5py.File) -> Sniffed:
    """The layout of an open HDF5 file, or IngestError for files this package does not read."""
    version = f.attrs.get("nwb_version")
    if version is not None:
        text = decode(version)
        major = text.removeprefix("NWB-").split(".")[0]
        if major.isdigit() and int(major) >= 2:
            return Sniffed("nwb2", text)
        raise IngestError(f"unsupported NWB version {text!r} (root attribute nwb_version)")
    if "nwb_version" in f and isinstance(f["nwb_version"], h5py.Dataset):
        try:
            text = decode(f["nwb_version"][()])
        except OSError as exc:
            raise IngestError(f"cannot read /nwb_version: {_first_line(exc)}") from None
        if text.startswith("NWB-1") or text.startswith("1."):
            if ALLEN_NWB1_MODULE in f:
                return Sniffed("nwb1_allen", text)
            raise IngestError(
                f"unsupported NWB 1 layout ({text}; only Allen Brain Observatory files with "
                f"/{ALLEN_NWB1_MODULE} are read)"
            )
        raise IngestError(f"unsupported NWB version {text!r} (/nwb_version dataset)")
    raise IngestError("HDF5 file is not NWB (no nwb_version attribute or /nwb_version dataset)")


def sniff(path: str | Path) -> Sniffed:
    """Open, sniff and close."""
    with open_h5(path) as f:
        return sniff_h5(f)
