"""Write one EPhys session as an Allen Visual Coding Neuropixels-like NWB 2 file (pynwb).

Why mimic the Allen layout exactly: the readers must serve real and synthetic files with the
same code, so the synthetic file has what the real ones have (see the NWB layout notes, 3b):
one device + ElectrodeGroup per probe, an electrodes table whose ``location`` is a CCF acronym
(several regions per session, some 'grey', some empty), a Units table that links to its region
only through ``peak_channel_id`` -> electrode **id** (no ``electrodes`` column), and one
``/intervals/<stimulus>_presentations`` TimeIntervals per stimulus with Allen's columns,
including the string ``size`` column. Metadata values that the model does not define (unit
quality metrics, positions) are plausible draws; they pass AllenSDK's default unit filters.
"""

from __future__ import annotations

import datetime as dt
import uuid
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ingest.synth.schedule import SPONTANEOUS, STIMULUS_INDEX, TASK_NAMES, Schedule

#: pynwb refuses an empty location; it is written as this marker and patched to '' with h5py.
EMPTY_MARKER = "__empty_location__"
GREY = "grey"
CHANNELS_PER_PROBE = 48
N_GREY_CHANNELS, N_EMPTY_CHANNELS = 4, 2  # deepest channels of each probe lie outside the region
_REGION_CCF = {"VISp": (9000.0, 800.0), "VISl": (8800.0, 900.0), "VISal": (7900.0, 850.0),
               "VISam": (8100.0, 700.0), "VISpm": (8700.0, 650.0)}


@dataclass
class ProbeLayout:
    """Channels of a session's probes and the peak channel of every unit."""

    electrode_id: np.ndarray  # int64 (n_channels,)
    location: np.ndarray  # str, '' for unassigned channels
    probe: np.ndarray  # int64 probe index per channel
    probe_names: list[str]
    probe_ids: np.ndarray  # int64 per probe
    local_index: np.ndarray  # channel number on its probe
    vertical: np.ndarray  # um
    horizontal: np.ndarray  # um
    ccf: np.ndarray  # (n_channels, 3) x, y, z (z duplicates y, as in the Allen files)
    unit_channel: np.ndarray  # int64 row into the electrode arrays, per unit

    @property
    def unit_location(self) -> np.ndarray:
        return self.location[self.unit_channel]


def probe_layout(session_index: int, regions: Sequence[str], units_per_region: int, unassigned_units: int,
                 rng: np.random.Generator) -> ProbeLayout:
    """One probe per region; units of region r get peak channels inside r, unassigned units on grey/empty ones."""
    n_probes = len(regions)
    ch = np.arange(CHANNELS_PER_PROBE)
    loc, probe, local = [], [], []
    for p, region in enumerate(regions):
        here = np.full(CHANNELS_PER_PROBE, region, dtype=object)
        here[:N_GREY_CHANNELS] = GREY
        here[N_GREY_CHANNELS:N_GREY_CHANNELS + N_EMPTY_CHANNELS] = ""
        loc += list(here)
        probe += [p] * CHANNELS_PER_PROBE
        local += list(ch)
    location = np.asarray(loc, dtype=str)
    probe_a = np.asarray(probe, dtype=np.int64)
    local_a = np.asarray(local, dtype=np.int64)
    base = 850_000_000 + 10_000 * session_index
    electrode_id = base + 1000 * probe_a + local_a
    vertical = 20.0 * (local_a // 2) + 20.0
    horizontal = np.asarray([43.0, 11.0, 59.0, 27.0])[local_a % 4]
    ccf = np.zeros((len(location), 3))
    for p, region in enumerate(regions):
        ap, dv = _REGION_CCF.get(region, (8500.0, 1000.0))
        m = probe_a == p
        ccf[m, 0] = ap + rng.normal(0, 50)
        ccf[m, 1] = dv + 3800.0 - vertical[m]  # deeper channels (low index) sit lower
    ccf[:, 2] = ccf[:, 1]

    unit_channel = []
    for p, region in enumerate(regions):
        inside = np.flatnonzero((probe_a == p) & (location == region))
        unit_channel += list(rng.choice(inside, size=units_per_region))
    outside = np.flatnonzero(location != np.asarray(regions)[probe_a])
    grey, empty = outside[location[outside] == GREY], outside[location[outside] == ""]
    for k in range(unassigned_units):
        unit_channel.append(int(rng.choice(grey if k % 2 == 0 else empty)))
    return ProbeLayout(
        electrode_id=electrode_id, location=location, probe=probe_a,
        probe_names=[f"probe{chr(ord('A') + p)}" for p in range(n_probes)],
        probe_ids=760_000_000 + 10 * session_index + np.arange(n_probes, dtype=np.int64),
        local_index=local_a, vertical=vertical, horizontal=horizontal, ccf=ccf,
        unit_channel=np.asarray(unit_channel, dtype=np.int64),
    )


def _column(name: str, data: object, description: str):
    from hdmf.common import VectorData

    return VectorData(name=name, description=description, data=data)


def _ragged(name: str, values: Sequence[np.ndarray], description: str) -> list:
    from hdmf.common import VectorIndex

    flat = np.concatenate(values) if len(values) else np.zeros(0)
    data = _column(name, flat, description)
    index = VectorIndex(name=f"{name}_index", data=np.cumsum([len(v) for v in values]).astype(np.int64), target=data)
    return [data, index]


def _presentations_table(name: str, schedule: Schedule, task: str, description: str):
    """An Allen ``<stimulus>_presentations`` TimeIntervals: only the parameter columns that stimulus has."""
    from pynwb.epoch import TimeIntervals

    m = schedule.mask(task)
    n = int(m.sum())
    cols = [_column("start_time", schedule.start[m], "onset (s)"), _column("stop_time", schedule.end[m], "offset (s)"),
            _column("stimulus_name", [task] * n, "stimulus"),
            _column("stimulus_block", schedule.block[m].astype(np.float64), "block of consecutive presentations"),
            _column("stimulus_index", np.full(n, float(STIMULUS_INDEX[task])), "index of the stimulus type")]
    if task == "natural_scenes":
        cols.append(_column("frame", schedule.frame[m], "image index, -1 = blank"))
    else:
        cols.append(_column("contrast", np.full(n, 0.8), "contrast"))
        cols.append(_column("orientation", schedule.orientation[m], "degrees; NaN = blank sweep"))
        if task == "static_gratings":
            cols.append(_column("phase", schedule.phase[m], "phase"))
        else:  # the Allen writer turned this mixed column into strings
            cols.append(_column("phase", ["[42471.86666667, 42471.86666667]"] * n, "phase"))
        cols.append(_column("spatial_frequency", schedule.spatial_frequency[m], "cycles/degree"))
        if task == "drifting_gratings":
            cols.append(_column("temporal_frequency", schedule.temporal_frequency[m], "Hz"))
    cols.append(_column("size", ["[250.0, 250.0]"] * n, "degrees (string, as Allen wrote it)"))
    cols += _ragged("tags", [np.asarray(["stimulus_time_interval"])] * n, "tags")
    return TimeIntervals(name=name, description=description, columns=cols)


def _spontaneous_table(schedule: Schedule):
    from pynwb.epoch import TimeIntervals

    m = schedule.epoch_name == SPONTANEOUS
    n = int(m.sum())
    cols = [_column("start_time", schedule.epoch_start[m], "onset (s)"), _column("stop_time", schedule.epoch_stop[m], "offset (s)"),
            _column("stimulus_name", [SPONTANEOUS] * n, "stimulus"),
            _column("stimulus_block", schedule.epoch_block[m].astype(np.float64), "block"),
            _column("stimulus_index", np.full(n, float(STIMULUS_INDEX[SPONTANEOUS])), "index of the stimulus type")]
    cols += _ragged("tags", [np.asarray(["stimulus_time_interval"])] * n, "tags")
    return TimeIntervals(name="spontaneous_presentations", description="gray screen", columns=cols)


def write_ephys_nwb(path: Path, *, session_id: str, session_index: int, subject_id: str, start_time: dt.datetime,
                    layout: ProbeLayout, unit_ids: np.ndarray, spike_trains: Sequence[np.ndarray],
                    schedule: Schedule, rng: np.random.Generator) -> None:
    """Write the file; ``spike_trains[i]`` belongs to ``unit_ids[i]`` whose peak channel is ``layout.unit_channel[i]``."""
    from pynwb import NWBHDF5IO, NWBFile
    from pynwb.file import Subject
    from pynwb.misc import Units

    nwb = NWBFile(
        session_description="Synthetic Neuropixels recording mimicking Allen Visual Coding Neuropixels (ingest.synth)",
        identifier=f"ingest.synth {session_id}", session_start_time=start_time, file_create_date=[start_time],
        institution="Allen Institute for Brain Science (synthetic)", session_id=session_id,
        subject=Subject(subject_id=subject_id, species="Mus musculus", age="P100D", sex="M", genotype="wt/wt"),
    )
    groups = []
    for p, name in enumerate(layout.probe_names):
        dev = nwb.create_device(name=name, description=f"Neuropixels 1.0 probe {int(layout.probe_ids[p])}")
        groups.append(nwb.create_electrode_group(name=name, description=f"{name} shank", location="", device=dev))
    for col, desc in (("probe_vertical_position", "um from the tip"), ("probe_horizontal_position", "um across the shank"),
                      ("probe_id", "probe id"), ("local_index", "channel number on the probe"),
                      ("valid_data", "channel usable")):
        nwb.add_electrode_column(name=col, description=desc)
    for i in range(len(layout.electrode_id)):
        loc = str(layout.location[i]) or EMPTY_MARKER
        p = int(layout.probe[i])
        nwb.add_electrode(
            id=int(layout.electrode_id[i]), x=float(layout.ccf[i, 0]), y=float(layout.ccf[i, 1]), z=float(layout.ccf[i, 2]),
            imp=150_000.0, location=loc, filtering="AP band: 500 Hz high-pass; LFP band: 1000 Hz low-pass",
            group=groups[p], probe_vertical_position=int(layout.vertical[i]),
            probe_horizontal_position=int(layout.horizontal[i]), probe_id=int(layout.probe_ids[p]),
            local_index=int(layout.local_index[i]), valid_data=True,
        )

    n = len(unit_ids)
    duration = schedule.duration_s
    counts = np.asarray([len(t) for t in spike_trains])
    unit_amp = rng.uniform(80.0, 300.0, size=n)  # uV
    amplitudes = [np.abs(a * 1e-6 * (1 + 0.15 * rng.normal(size=len(t)))) for a, t in zip(unit_amp, spike_trains)]
    units = Units(name="units", description="synthetic sorted units", id=[int(u) for u in unit_ids], columns=[
        *_ragged("spike_times", [np.asarray(t, dtype=np.float64) for t in spike_trains], "spike times (s)"),
        *_ragged("spike_amplitudes", amplitudes, "amplitude of each spike (V)"),
        _column("peak_channel_id", layout.electrode_id[layout.unit_channel], "electrode id of the peak channel"),
        _column("cluster_id", np.arange(n, dtype=np.int64), "cluster id from spike sorting"),
        _column("local_index", np.arange(n, dtype=np.int64), "unit index within the session"),
        _column("quality", ["good"] * n, "sorting quality"),
        _column("firing_rate", counts / duration, "spikes/s over the session"),
        _column("isi_violations", rng.uniform(0.0, 0.3, size=n), "ISI violation rate"),
        _column("presence_ratio", rng.uniform(0.96, 0.99, size=n), "fraction of blocks with spikes"),
        _column("amplitude_cutoff", rng.uniform(0.0, 0.08, size=n), "estimated fraction of missed spikes"),
        _column("snr", rng.uniform(1.5, 5.0, size=n), "waveform signal-to-noise"),
        _column("amplitude", unit_amp, "mean peak-to-trough amplitude (uV)"),
    ])
    nwb.units = units

    for task in TASK_NAMES:
        nwb.add_time_intervals(_presentations_table(f"{task}_presentations", schedule, task, f"{task} presentations"))
    nwb.add_time_intervals(_spontaneous_table(schedule))

    stable_object_ids(nwb, session_id)
    with warnings.catch_warnings():  # the caller writes to a temp name (shards.atomic.atomic_path)
        warnings.filterwarnings("ignore", message=r".*does not end in '\.nwb'.*")
        with NWBHDF5IO(str(path), "w") as io:
            io.write(nwb)
    patch_empty_locations(path)


def stable_object_ids(nwb: object, namespace: str) -> None:
    """Replace hdmf's random uuid4 object ids by uuid5 of (namespace, position, path), so reruns write identical bytes.

    hdmf offers no public setter; when its private attribute is missing (a future hdmf), the ids
    stay random and only the ``object_id`` attributes differ between reruns.
    """
    ns = uuid.uuid5(uuid.NAMESPACE_URL, namespace)
    for i, child in enumerate(nwb.all_children()):  # type: ignore[attr-defined]
        if not hasattr(child, "_AbstractContainer__object_id"):
            return
        parts, node = [], child
        while node is not None:
            parts.append(f"{type(node).__name__}:{node.name}")
            node = node.parent
        child._AbstractContainer__object_id = str(uuid.uuid5(ns, f"{i}/" + "/".join(reversed(parts))))


def patch_empty_locations(path: Path) -> None:
    """Replace the marker by '' in the electrodes ``location`` column (what real files hold, pynwb won't write)."""
    with h5py.File(path, "r+") as f:
        ds = f["general/extracellular_ephys/electrodes/location"]
        values = ds.asstr()[()]
        for i in np.flatnonzero(values == EMPTY_MARKER):
            ds[i] = ""
