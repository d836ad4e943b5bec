"""The one OPhys record of an imaging plane, built the same way by the NWB 1 (Allen) and NWB 2 readers."""

from __future__ import annotations

import numpy as np

from ingest.records import Intervals, SessionRecord, make_trace
from ingest.regions import UNKNOWN, region_name


def plane_record(*, session_id: str, subject: str, source_file: str, ids: list[str], meta: dict[str, list],
                 frame_times: np.ndarray, data: object, units_first: bool, rows: np.ndarray | None,
                 raw_location: str, stimuli: list[Intervals], warns: list[str]) -> SessionRecord:
    """The one OPhys record of an imaging plane (NWB 1 and NWB 2 readers alike): region from the
    plane's location, unknown (with a warning) when it names none."""
    region = region_name(raw_location)
    if region == UNKNOWN and raw_location:
        warns.append(f"imaging plane location {raw_location!r} names no region -> 'unknown'")
    meta["location_raw"] = [raw_location] * len(ids)
    return SessionRecord(session_id=session_id, modality="ophys", region=region, subject=subject,
                         source_file=source_file, unit_ids=ids, t_start=float(frame_times[0]),
                         t_end=float(frame_times[-1]), stimuli=list(stimuli),
                         trace=make_trace(frame_times, data, units_first, rows), unit_meta=meta, warnings=warns)
