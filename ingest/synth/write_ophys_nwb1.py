"""Write one OPhys experiment as an Allen Brain Observatory NWB 1.0.5 file (h5py; pynwb cannot).

Why: the ~1,300 released Visual Coding 2P experiments (``BrainObservatoryCache``) are NWB 1.0.5
files, and the ingest reads them with its own h5py reader. This writer reproduces the paths,
dtypes and quirks listed in the layout notes (3a(i)): the version is the *dataset*
``/nwb_version``, every string is fixed-length bytes, dF/F is stored ROIs x frames, stimuli are
AbstractFeatureSeries / IndexSeries groups whose ``frame_duration`` holds [start, end] 2P frame
indices, natural-scene blanks are -1. It also satisfies AllenSDK's own reader
(``BrainObservatoryNwbDataSet``): the device string ``"<device>. <name> Please ..."``, the subject
age ``"<n> days"`` and ``generated_by[-1]`` being a pipeline version string.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from ingest.synth.schedule import SPONTANEOUS, Schedule
from ingest.synth.write_ophys_nwb2 import FOV_PIXELS, OphysData

PIPELINE = "processing/brain_observatory_pipeline"
HELP_URL = "http://help.brain-map.org/display/observatory/Allen+Brain+Observatory"
_VLEN_BYTES = h5py.special_dtype(vlen=bytes)
_STIM_COMMENT = b"The data stored here is a precursor for what was displayed (synthetic, ingest.synth)"


def _s(value: str) -> np.bytes_:
    """A fixed-length bytes scalar (what the Allen writer produced for every string)."""
    return np.bytes_(value.encode())


def _text(g: h5py.Group, name: str, value: str, **attrs: object) -> h5py.Dataset:
    ds = g.create_dataset(name, data=_s(value))
    for k, v in attrs.items():
        ds.attrs[k] = _s(v) if isinstance(v, str) else v
    return ds


def _texts(g: h5py.Group, name: str, values: Sequence[str]) -> h5py.Dataset:
    return g.create_dataset(name, data=np.asarray([v.encode() for v in values]))


def _series(g: h5py.Group, ancestry: Sequence[str], description: str, **attrs: object) -> None:
    g.attrs["ancestry"] = np.asarray([a.encode() for a in ancestry])
    g.attrs["neurodata_type"] = "TimeSeries"
    g.attrs["description"] = _s(description)
    g.attrs["source"] = ""
    g.attrs["comments"] = ""
    for k, v in attrs.items():
        g.attrs[k] = v


def _data(g: h5py.Group, data: np.ndarray, unit: str, **kw: object) -> h5py.Dataset:
    ds = g.create_dataset("data", data=data, **kw)
    ds.attrs["conversion"] = np.float64(1.0)
    ds.attrs["resolution"] = np.float64(1.0)
    ds.attrs["unit"] = _s(unit)
    return ds


def _timestamps(g: h5py.Group, ts: np.ndarray | h5py.Dataset) -> None:
    if isinstance(ts, h5py.Dataset):
        g["timestamps"] = ts  # hard link, like the Allen files' shared 2P clock
        return
    ds = g.create_dataset("timestamps", data=np.asarray(ts, dtype=np.float64))
    ds.attrs["interval"] = np.int64(1)
    ds.attrs["unit"] = _s("Seconds")


def _frame_index(frame_times: np.ndarray, t: np.ndarray) -> np.ndarray:
    """The first 2P frame at or after each time (clipped to the last frame)."""
    return np.minimum(np.searchsorted(frame_times, t), len(frame_times) - 1).astype(np.int64)


def _general(f: h5py.File, session_id: str, experiment_id: int, container_id: int, subject_id: str,
             data: OphysData) -> None:
    g = f.create_group("general")
    _text(g, "session_id", str(experiment_id), comments="ID corresponds to Allen Institute 'experiment_sessions ID'")
    for name, value in (("ophys_experiment_id", str(experiment_id)), ("experiment_container_id", str(container_id)),
                        ("ophys_experiment_name", session_id), ("session_type", "synthetic_all_tasks"),
                        ("specimen_name", f"Cux2-CreERT2;Camk2a-tTA;Ai93-{subject_id}"),
                        ("fov", f"400x400 microns ({FOV_PIXELS} x {FOV_PIXELS} pixels)"), ("pixel_size", "0.78 (um)"),
                        ("targeted_structure", data.region),
                        ("For more information", f"For more information, please see {HELP_URL}")):
        _text(g, name, value, neurodata_type="Custom")
    gb = _texts(g, "generated_by", ["ingest.synth", "3.0"])
    gb.attrs["neurodata_type"] = _s("Custom")
    _text(g, "institution", "Allen Institute for Brain Science (synthetic)")
    dev = g.create_group("devices")
    _text(dev, "2-photon microscope", f"Synthetic two-photon microscope. SYNTH2P.1 Please see {HELP_URL} for details")
    _text(dev, "display monitor", f"Synthetic monitor. Please see {HELP_URL} for details")
    subj = g.create_group("subject")
    for name, value in (("age", "90 days"), ("description", "Mus musculus in vivo"),
                        ("genotype", "Cux2-CreERT2/wt;Camk2a-tTA/wt;Ai93(TITL-GCaMP6f)/wt"), ("sex", "female"),
                        ("species", "Mus musculus"), ("subject_id", subject_id)):
        _text(subj, name, value)
    plane = g.create_group("optophysiology/imaging_plane_1")
    ch = plane.create_group("channel-1")
    _text(ch, "description", "Only optical channel used")
    _text(ch, "emission_lambda", "See emission properties of GCaMP6f")
    _text(plane, "description", f"Please see {HELP_URL} for details")
    _text(plane, "device", "2-photon microscope")
    _text(plane, "excitation_lambda", "910 nanometers")
    _text(plane, "imaging depth", f"{data.imaging_depth_um} microns", neurodata_type="Custom")
    rate = 1.0 / float(np.median(np.diff(data.frame_times)))
    _text(plane, "imaging_rate", f"{rate:.0f}Hz")
    _text(plane, "indicator", "GCaMP6f")
    _text(plane, "location", data.region)


def _pipeline(f: h5py.File, data: OphysData) -> h5py.Dataset:
    """DfOverF, Fluorescence, ImageSegmentation, running speed; returns the 2P timestamps dataset."""
    mod = f.create_group(PIPELINE)
    mod.attrs["interfaces"] = np.asarray([b"BehavioralTimeSeries", b"DfOverF", b"Fluorescence", b"ImageSegmentation"])
    mod.attrs["neurodata_type"] = "Module"
    n_rois, n_frames = len(data.roi_ids), len(data.frame_times)
    roi_names = [str(int(r)) for r in data.roi_ids]
    seg_path = _s(f"{PIPELINE}/ImageSegmentation")

    dff = mod.create_group("DfOverF/imaging_plane_1")
    mod["DfOverF"].attrs["neurodata_type"] = "Interface"
    _series(dff, ["TimeSeries", "RoiResponseSeries"], "DF/F data for imaging plane imaging_plane_1")
    _data(dff, np.ascontiguousarray(data.dff.T), "None")  # ROIs x frames, as AllenSDK reads it
    _timestamps(dff, data.frame_times)
    dff.create_dataset("num_samples", data=np.int32(n_frames))
    _texts(dff, "roi_names", roi_names)
    dff.create_dataset("segmentation_interface_path", data=seg_path)
    ts = dff["timestamps"]

    fl = mod.create_group("Fluorescence")
    fl.attrs["neurodata_type"] = "Interface"
    raw = (data.f0[:, None] * (1.0 + data.dff.T)).astype(np.float32)
    for name, values, desc in (("imaging_plane_1", raw, "Fluorescence data for imaging plane imaging_plane_1"),
                               ("imaging_plane_1_neuropil_response",
                                np.repeat((0.7 * data.f0)[:, None], n_frames, axis=1).astype(np.float32),
                                "Neuropil fluorescence data for imaging plane imaging_plane_1")):
        g = fl.create_group(name)
        _series(g, ["TimeSeries", "RoiResponseSeries"], desc)
        _data(g, values, "None", compression="gzip", compression_opts=1) if "neuropil" in name else _data(g, values, "None")
        _timestamps(g, ts)
        g.create_dataset("num_samples", data=np.int32(n_frames))
        _texts(g, "roi_names", roi_names)
        g.create_dataset("r", data=np.zeros(n_rois, dtype=np.float32))
        g.create_dataset("rmse", data=np.zeros(n_rois, dtype=np.float32))
        g.create_dataset("segmentation_interface_path", data=seg_path)
    # no overlapping ROIs, so demixing changes nothing: the demixed signal is the raw one (a hard link)
    demixed = fl.create_group("imaging_plane_1_demixed_signal")
    _series(demixed, ["TimeSeries", "RoiResponseSeries"], "Demixed traces (synthetic ROIs do not overlap)")
    demixed["data"] = fl["imaging_plane_1/data"]
    _timestamps(demixed, ts)
    demixed.create_dataset("num_samples", data=np.int32(n_frames))
    demixed.create_dataset("segmentation_interface_path", data=seg_path)

    seg = mod.create_group("ImageSegmentation")
    seg.attrs["neurodata_type"] = "Interface"
    seg.create_dataset("cell_specimen_ids", data=np.asarray(data.cell_specimen_ids, dtype=np.int64))
    _texts(seg, "roi_ids", roi_names)
    plane = seg.create_group("imaging_plane_1")
    _text(plane, "description", "Image segmentation masks for 2-P imaging")
    _text(plane, "imaging_plane_name", "imaging_plane_1")
    roi_list = [f"roi_{j:04d}" for j in range(n_rois)]
    _texts(plane, "roi_list", roi_list)
    for j, name in enumerate(roi_list):
        r = plane.create_group(name)
        px = np.asarray(data.pixel_mask(j))
        mask = np.zeros((FOV_PIXELS, FOV_PIXELS), dtype=np.float32)
        mask[px[:, 1].astype(int), px[:, 0].astype(int)] = 1.0
        r.create_dataset("img_mask", data=mask, compression="gzip", compression_opts=1, chunks=(128, 128))
        r.create_dataset("pix_mask", data=px[:, :2].T.astype(np.uint16))
        r.create_dataset("pix_mask_weight", data=px[:, 2].astype(np.float32))
        _text(r, "roi_description", "cell")
    mip = plane.create_group("reference_images/maximum_intensity_projection_image")
    _series(mip, ["TimeSeries", "ImageSeries"], "maximum intensity projection")
    _data(mip, np.zeros((FOV_PIXELS, FOV_PIXELS), dtype=np.uint16), "grayscale", compression="gzip",
          compression_opts=1, chunks=(128, 128))

    run = mod.create_group("BehavioralTimeSeries/running_speed")
    mod["BehavioralTimeSeries"].attrs["neurodata_type"] = "Interface"
    _series(run, ["TimeSeries"], "Velocity of the running wheel in context of 2p_image_series timeline")
    _data(run, np.zeros(n_frames, dtype=np.float32), "cm/s")
    _timestamps(run, ts)
    run.create_dataset("num_samples", data=np.int32(n_frames))
    return ts


def _stimuli(f: h5py.File, schedule: Schedule, frame_times: np.ndarray, ts: h5py.Dataset,
             templates: np.ndarray) -> None:
    pres = f.create_group("stimulus/presentation")
    comments = {"comments": _STIM_COMMENT}

    def group(name: str, ancestry: list[str], data: np.ndarray, start: np.ndarray, stop: np.ndarray,
              unit: str, fd_dtype: type) -> h5py.Group:
        g = pres.create_group(name)
        _series(g, ancestry, name, **comments)
        _data(g, data, unit)
        _timestamps(g, frame_times[_frame_index(frame_times, start)])
        fd = np.stack([_frame_index(frame_times, start), _frame_index(frame_times, stop)], axis=1)
        fd_ds = g.create_dataset("frame_duration", data=fd.astype(fd_dtype))
        fd_ds.attrs["neurodata_type"] = _s("Custom")
        g.create_dataset("num_samples", data=np.int32(len(data)))
        return g

    m = schedule.mask("static_gratings")
    sg = np.stack([schedule.orientation[m], schedule.spatial_frequency[m], schedule.phase[m]], axis=1)
    g = group("static_gratings_stimulus", ["TimeSeries", "AbstractFeatureSeries"], sg.astype(np.float32),
              schedule.start[m], schedule.end[m], "see 'feature_units'", np.float32)
    _texts(g, "features", ["orientation", "spatial_frequency", "phase"])
    _texts(g, "feature_units", ["degrees", "cycles per degree", "unitless"])

    m = schedule.mask("drifting_gratings")
    blank = np.isnan(schedule.orientation[m])
    dg = np.stack([schedule.temporal_frequency[m], schedule.orientation[m], blank.astype(np.float64)], axis=1)
    g = group("drifting_gratings_stimulus", ["TimeSeries", "AbstractFeatureSeries"], dg.astype(np.float32),
              schedule.start[m], schedule.end[m], "see 'feature_units'", np.float32)
    _texts(g, "features", ["temporal_frequency", "orientation", "blank_sweep"])
    _texts(g, "feature_units", ["Hz", "degrees", "bool"])

    m = schedule.mask("natural_scenes")
    g = group("natural_scenes_stimulus", ["TimeSeries", "IndexSeries"], schedule.frame[m].astype(np.int64),
              schedule.start[m], schedule.end[m], "frame", np.int64)
    g.create_dataset("indexed_timeseries_path", data=_s("/stimulus/templates/natural_scenes_image_stack"))

    sp = schedule.epoch_name == SPONTANEOUS
    starts, stops = schedule.epoch_start[sp], schedule.epoch_stop[sp]
    events = np.empty(2 * len(starts), dtype=np.int8)
    events[0::2], events[1::2] = 1, -1
    times = np.empty(2 * len(starts))
    times[0::2], times[1::2] = starts, stops
    group("spontaneous_stimulus", ["TimeSeries", "IntervalSeries"], events, times, times, "interval", np.int64)

    tpl = f.create_group("stimulus/templates/natural_scenes_image_stack")
    _series(tpl, ["TimeSeries"], "Frames presented as part of the natural scenes stimulus.", **comments)
    _data(tpl, templates.astype(np.float32), "frame")
    tpl.create_dataset("dimension", data=np.asarray(templates.shape[::-1][:2], dtype=np.int64))
    tpl.create_dataset("format", data=_s("raw"))


def write_ophys_nwb1(path: Path, *, session_id: str, experiment_id: int, container_id: int, subject_id: str,
                     start_time: dt.datetime, data: OphysData, schedule: Schedule) -> None:
    with h5py.File(path, "w", track_order=False) as f:
        f.create_dataset("nwb_version", data=b"NWB-1.0.5", dtype=_VLEN_BYTES)
        f.create_dataset("identifier", dtype=_VLEN_BYTES,
                         data=f"Brain Observatory Visual Coding Experiment {experiment_id}; NWB-1.0.5; "
                              f"synthetic {session_id}".encode())
        f.create_dataset("session_description", dtype=_VLEN_BYTES,
                         data=b"2-photon recording of visual areas in head-fixed mouse with visual stimulus (synthetic)")
        f.create_dataset("session_start_time", data=_s(start_time.strftime("%a %b %d %H:%M:%S %Y")))
        f.create_dataset("file_create_date", data=[start_time.isoformat().encode()], dtype=_VLEN_BYTES)
        for name in ("acquisition/timeseries", "acquisition/images", "analysis"):
            f.create_group(name)
        f.create_group("epochs").attrs["tags"] = _s("[]")
        _general(f, session_id, experiment_id, container_id, subject_id, data)
        ts = _pipeline(f, data)
        _stimuli(f, schedule, data.frame_times, ts, data.templates)
