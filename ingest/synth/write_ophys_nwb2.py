"""Write one OPhys experiment as a DANDI 000728-like NWB 2 file (pynwb).

Why this layout: 000728 is the public NWB 2 conversion of the Allen Brain Observatory 2P
experiments, so a reader that handles this file handles the real conversions (layout notes,
3a(ii)): ImagingPlane "ImagingPlane" whose ``location`` is the region, PlaneSegmentation with a
``global_roi_id`` column, ``DfOverF/DfOverF`` whose timestamps are an HDF5 link to
``Fluorescence/Corrected/timestamps``, grating tables added with ``add_stimulus`` (so they land in
``/stimulus/presentation``), natural scenes as an IndexSeries over an ``Images`` template with the
NWB1 blank (-1) cast to uint32, and ``/intervals/epochs`` with a ``stimulus_type`` column.
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ingest.synth.schedule import N_IMAGES, Schedule
from ingest.synth.write_ephys import stable_object_ids

BLANK_UINT32 = np.uint32(2**32 - 1)
FOV_PIXELS = 512


@dataclass
class OphysData:
    """What an OPhys writer needs besides the schedule (shared by the NWB 2 and NWB 1 writers)."""

    region: str
    roi_ids: np.ndarray  # int64 local ROI ids
    cell_specimen_ids: np.ndarray  # int64 global ids
    frame_times: np.ndarray  # float64 (n_frames,)
    dff: np.ndarray  # float32 (n_frames, n_rois)
    f0: np.ndarray  # float64 (n_rois,) baseline fluorescence
    roi_centers: np.ndarray  # int64 (n_rois, 2) y, x in pixels
    templates: np.ndarray  # uint8 (118, h, w) natural scene images
    imaging_depth_um: int = 275

    def pixel_mask(self, j: int) -> list[tuple[int, int, float]]:
        """A small disk of pixels around ROI j's centre: (x, y, weight) triples, as pynwb wants."""
        cy, cx = (int(v) for v in self.roi_centers[j])
        out = []
        for dy in range(-3, 4):
            for dx in range(-3, 4):
                if dy * dy + dx * dx <= 9:
                    out.append((cx + dx, cy + dy, 1.0))
        return out


def _intervals(name: str, description: str, columns: dict[str, tuple[object, str]]):
    from hdmf.common import VectorData
    from pynwb.epoch import TimeIntervals

    cols = [VectorData(name=k, description=d, data=v) for k, (v, d) in columns.items()]
    return TimeIntervals(name=name, description=description, columns=cols)


def _grating_tables(schedule: Schedule) -> list:
    out = []
    m = schedule.mask("static_gratings")
    blank = np.isnan(schedule.orientation[m])
    out.append(_intervals("static_gratings", "static gratings presentations", {
        "start_time": (schedule.start[m], "onset (s)"), "stop_time": (schedule.end[m], "offset (s)"),
        "orientation_in_degrees": (schedule.orientation[m], "orientation; NaN on blank sweeps"),
        "spatial_frequency_in_cycles_per_degree": (schedule.spatial_frequency[m], "spatial frequency"),
        "phase": (schedule.phase[m], "phase"),
        "is_blank_sweep": (blank, "gray screen instead of a grating"),
    }))
    m = schedule.mask("drifting_gratings")
    blank = np.isnan(schedule.orientation[m])
    out.append(_intervals("drifting_gratings", "drifting gratings presentations", {
        "start_time": (schedule.start[m], "onset (s)"), "stop_time": (schedule.end[m], "offset (s)"),
        "orientation_in_degrees": (schedule.orientation[m], "direction of motion; NaN on blank sweeps"),
        "spatial_frequency_in_cycles_per_degree": (np.full(int(m.sum()), 0.04), "spatial frequency"),
        "temporal_frequency_in_hz": (schedule.temporal_frequency[m], "temporal frequency"),
        "is_blank_sweep": (blank, "gray screen instead of a grating"),
    }))
    return out


def write_ophys_nwb2(path: Path, *, session_id: str, subject_id: str, start_time: dt.datetime, data: OphysData,
                     schedule: Schedule) -> None:
    from pynwb import NWBHDF5IO, H5DataIO, NWBFile
    from pynwb.base import Images
    from pynwb.file import Subject
    from pynwb.image import GrayscaleImage, IndexSeries
    from pynwb.ophys import DfOverF, Fluorescence, ImageSegmentation, OpticalChannel

    nwb = NWBFile(
        session_description="Synthetic 2-photon experiment mimicking DANDI 000728 (ingest.synth)",
        identifier=f"ingest.synth {session_id}", session_start_time=start_time, file_create_date=[start_time],
        institution="Allen Institute for Brain Science (synthetic)", session_id=session_id,
        subject=Subject(subject_id=subject_id, species="Mus musculus", age="P90D", sex="F",
                        genotype="Cux2-CreERT2/wt;Camk2a-tTA/wt;Ai93(TITL-GCaMP6f)/wt"),
    )
    device = nwb.create_device(name="Microscope", description="synthetic two-photon microscope")
    plane = nwb.create_imaging_plane(
        name="ImagingPlane", optical_channel=OpticalChannel(name="OpticalChannel", description="GCaMP6f emission", emission_lambda=520.0),
        description=f"imaging plane at {data.imaging_depth_um} microns depth in {data.region}", device=device,
        excitation_lambda=910.0, imaging_rate=float(1.0 / np.median(np.diff(data.frame_times))), indicator="GCaMP6f",
        location=data.region, grid_spacing=[0.78, 0.78], grid_spacing_unit="micrometers",
    )
    module = nwb.create_processing_module(name="ophys", description="processed 2P data")
    seg = ImageSegmentation(name="ImageSegmentation")
    ps = seg.create_plane_segmentation(name="PlaneSegmentation", description="segmented cells", imaging_plane=plane)
    ps.add_column(name="global_roi_id", description="cell_specimen_id: the cell across experiments")
    for j, rid in enumerate(data.roi_ids):
        ps.add_roi(id=int(rid), pixel_mask=data.pixel_mask(j), global_roi_id=int(data.cell_specimen_ids[j]))
    module.add(seg)

    n_rois = len(data.roi_ids)

    def region():
        return ps.create_roi_table_region(region=list(range(n_rois)), description="all ROIs")

    corrected_f = (data.f0[None, :] * (1.0 + data.dff)).astype(np.float32)
    neuropil_f = np.repeat((0.7 * data.f0)[None, :], len(data.frame_times), axis=0).astype(np.float32)
    fluo = Fluorescence(name="Fluorescence")
    module.add(fluo)  # containers first: the ROI regions must share an ancestor with the table
    corrected = fluo.create_roi_response_series(name="Corrected", data=corrected_f, rois=region(), unit="a.u.",
                                                timestamps=data.frame_times,
                                                description="neuropil-corrected fluorescence")
    fluo.create_roi_response_series(name="Neuropil", data=H5DataIO(neuropil_f, compression="gzip", compression_opts=1), rois=region(), unit="a.u.", timestamps=corrected,
                                    description="neuropil fluorescence")
    dff = DfOverF(name="DfOverF")
    module.add(dff)
    dff.create_roi_response_series(name="DfOverF", data=data.dff, rois=region(), unit="a.u.", timestamps=corrected,
                                   description="dF/F")

    for table in _grating_tables(schedule):
        nwb.add_stimulus(table)
    images = Images(name="natural_scenes_template", description="natural scene images (synthetic)",
                    images=[GrayscaleImage(name=f"NaturalScene{i}", data=data.templates[i]) for i in range(N_IMAGES)])
    nwb.add_stimulus_template(images)
    m = schedule.mask("natural_scenes")
    frame = schedule.frame[m]
    index = np.where(frame < 0, BLANK_UINT32, frame).astype(np.uint32)
    nwb.add_stimulus(IndexSeries(name="natural_scenes_stimulus", data=index, indexed_images=images, unit="N/A",
                                 timestamps=schedule.start[m], description="natural scene index; 4294967295 = blank"))

    nwb.add_epoch_column(name="stimulus_type", description="stimulus shown in this epoch")
    for name, a, b in zip(schedule.epoch_name, schedule.epoch_start, schedule.epoch_stop):
        nwb.add_epoch(start_time=float(a), stop_time=float(b), stimulus_type=str(name))

    stable_object_ids(nwb, session_id)
    with warnings.catch_warnings():  # the caller writes to a temp name (shards.atomic.atomic_path)
        warnings.filterwarnings("ignore", message=r".*does not end in '\.nwb'.*")
        with NWBHDF5IO(str(path), "w") as io:
            io.write(nwb)
