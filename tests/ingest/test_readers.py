"""ingest.readers: real NWB fixtures, hand-made Allen-like files and broken files -> records or IngestError."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest

from ingest.readers import Sniffed, open_records, sniff
from ingest.records import ArrayTrace, IngestError
from shards.schema import DRIFTING_GRATINGS, GENERIC_TASK, NATURAL_SCENES, STATIC_GRATINGS, labels_for
from tests.support import REAL_FIXTURES as REAL  # noqa: E402

T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)


# ---- writers for small files ---------------------------------------------------------------------
def _nwbfile(subject_id: str = "mouse1"):
    from pynwb import NWBFile
    from pynwb.file import Subject

    return NWBFile(session_description="test", identifier="test", session_start_time=T0,
                   subject=Subject(subject_id=subject_id, species="Mus musculus"))


def _write(nwb, path: Path) -> Path:
    from pynwb import NWBHDF5IO

    with NWBHDF5IO(str(path), "w") as io:
        io.write(nwb)
    return path


def _add_presentations(nwb, name: str, start, stop, **columns) -> None:
    from pynwb.epoch import TimeIntervals

    table = TimeIntervals(name=name, description=name)
    for col in columns:
        table.add_column(col, col)
    for i in range(len(start)):
        table.add_interval(start_time=float(start[i]), stop_time=float(stop[i]),
                           **{k: v[i] for k, v in columns.items()})
    nwb.add_time_intervals(table)


def neuropixels_like(path: Path, units: list[dict], locations: dict[int, str], stimuli: bool = True) -> Path:
    """Allen-Neuropixels-like: electrodes with channel ids + CCF locations, units with peak_channel_id."""
    nwb = _nwbfile()
    device = nwb.create_device("probeA")
    group = nwb.create_electrode_group("probeA", description="probe", location="", device=device)
    for cid, loc in locations.items():
        nwb.add_electrode(id=cid, location=loc or "PLACEHOLDER", group=group)  # pynwb refuses ''; patched below
    nwb.add_unit_column("peak_channel_id", "peak channel (electrodes id)")
    nwb.add_unit_column("quality", "quality")
    nwb.add_unit_column("firing_rate", "rate")
    nwb.add_unit_column("waveform_mean", "mean waveform")
    for u in units:
        nwb.add_unit(id=u["id"], spike_times=u["spikes"], peak_channel_id=u["channel"], quality="good",
                     firing_rate=float(len(u["spikes"])), waveform_mean=np.zeros(5))
    if stimuli:
        s = np.arange(10) * 0.3
        _add_presentations(nwb, "static_gratings_presentations", s, s + 0.25,
                           orientation=np.array([0, 30, np.nan, 60, 90, 120, 150, 0, 45, 30], float),
                           size=["[250.0, 250.0]"] * 10)
        s = 10 + np.arange(6) * 3.0
        _add_presentations(nwb, "drifting_gratings_presentations", s, s + 2.0,
                           orientation=["0.0", "45.0", "N/A", "315.0", "90.0", "180.0"])
        s = 40 + np.arange(5) * 0.25
        _add_presentations(nwb, "natural_scenes_presentations", s, s + 0.25,
                           frame=np.array([3, -1, 117, 0, 5], float))
        _add_presentations(nwb, "spontaneous_presentations", [50.0], [80.0])
    _write(nwb, path)
    with h5py.File(path, "r+") as f:  # empty locations, as Allen files have for unassigned channels
        loc = f["general/extracellular_ephys/electrodes/location"]
        for i, value in enumerate(locations.values()):
            if not value:
                loc[i] = ""
    return path


def ophys_000728_like(path: Path, dff: np.ndarray, ts: np.ndarray | None, roi_ids, location: str = "VISl",
                      schedule: dict | None = None, container: str = "DfOverF", rate: float | None = None) -> Path:
    """DANDI-000728-like 2P file: PlaneSegmentation + DfOverF (timestamps linked to Fluorescence/Corrected)."""
    from pynwb.epoch import TimeIntervals
    from pynwb.image import GrayscaleImage, Images, IndexSeries
    from pynwb.ophys import DfOverF, Fluorescence, ImageSegmentation, OpticalChannel

    nwb = _nwbfile("specimen7")
    device = nwb.create_device("Microscope")
    plane = nwb.create_imaging_plane(name="ImagingPlane", optical_channel=OpticalChannel(name="ch", description="ch", emission_lambda=520.0),
                                     description="plane", device=device, excitation_lambda=910.0,
                                     imaging_rate=30.0, indicator="GCaMP6f", location=location)
    module = nwb.create_processing_module("ophys", "processed 2P")
    seg = ImageSegmentation(name="ImageSegmentation")
    ps = seg.create_plane_segmentation(name="PlaneSegmentation", description="rois", imaging_plane=plane)
    ps.add_column("global_roi_id", "cell specimen id")
    for k, rid in enumerate(roi_ids):
        ps.add_roi(id=int(rid), pixel_mask=[(k, k, 1.0)], global_roi_id=1000 + int(rid))
    module.add(seg)
    rois = ps.create_roi_table_region(region=list(range(len(roi_ids))), description="all")
    timing = dict(timestamps=ts) if rate is None else dict(rate=rate, starting_time=float(ts[0]))
    fluorescence = Fluorescence(name="Fluorescence")
    module.add(fluorescence)
    corrected = fluorescence.create_roi_response_series(name="Corrected", data=dff + 1.0, unit="n.a.", rois=rois,
                                                        **timing)
    if container == "DfOverF":
        df_over_f = DfOverF(name="DfOverF")
        module.add(df_over_f)
        link = dict(timestamps=corrected) if rate is None else timing
        df_over_f.create_roi_response_series(name="DfOverF", data=dff, unit="a.u.", rois=rois, **link)
    if schedule:
        for task in ("static_gratings", "drifting_gratings"):
            if task not in schedule:
                continue
            start, stop, values = schedule[task]
            table = TimeIntervals(name=task, description=task)
            table.add_column("orientation_in_degrees", "deg")
            table.add_column("is_blank_sweep", "blank")
            for a, b, v in zip(start, stop, values):
                table.add_interval(start_time=float(a), stop_time=float(b), orientation_in_degrees=float(v),
                                   is_blank_sweep=bool(np.isnan(v)))
            nwb.add_stimulus(table)
        if "natural_scenes" in schedule:
            start, _, values = schedule["natural_scenes"]
            images = Images(name="natural_scenes_template", description="scenes",
                            images=[GrayscaleImage(name=f"NaturalScene{i}", data=np.zeros((2, 2))) for i in range(118)])
            nwb.add_stimulus_template(images)
            idx = np.where(np.asarray(values) < 0, 2**32 - 1, values).astype(np.uint32)
            nwb.add_stimulus(IndexSeries(name="natural_scenes_stimulus", data=idx, indexed_images=images,
                                         unit="N/A", timestamps=np.asarray(start, float)))
    return _write(nwb, path)


def allen_nwb1_like(path: Path, dff: np.ndarray, ts: np.ndarray, roi_ids, location: str = "VISl",
                    frames: dict | None = None, num_samples: int | None = None) -> Path:
    """Allen Brain Observatory NWB 1.0.5 layout written with h5py: dF/F ROIs x frames, bytes strings."""
    with h5py.File(path, "w") as f:
        f["nwb_version"] = np.bytes_("NWB-1.0.5")
        f["general/targeted_structure"] = np.bytes_(location)
        f["general/optophysiology/imaging_plane_1/location"] = np.bytes_(location)
        f["general/specimen_name"] = np.bytes_("Cux2-CreERT2;Ai93-1234")
        f["general/subject/subject_id"] = np.bytes_("specimen7")
        pipe = f.create_group("processing/brain_observatory_pipeline")
        g = pipe.create_group("DfOverF/imaging_plane_1")
        g["data"] = dff.T.astype(np.float32)
        g["timestamps"] = ts
        g["num_samples"] = np.int32(len(ts) if num_samples is None else num_samples)
        g["roi_names"] = np.array([f"roi_{int(r):04d}".encode() for r in roi_ids])
        pipe["ImageSegmentation/roi_ids"] = np.array([str(int(r)).encode() for r in roi_ids])
        pipe["ImageSegmentation/cell_specimen_ids"] = np.array([1000 + int(r) for r in roi_ids], dtype=np.int64)
        for task, (fs, fe, values) in (frames or {}).items():
            s = f.create_group(f"stimulus/presentation/{task}_stimulus")
            s["frame_duration"] = np.stack([fs, fe], axis=1).astype(np.int64)
            s["timestamps"] = ts[fs]
            s["num_samples"] = np.int32(len(fs))
            if task == "static_gratings":
                s["features"] = np.array([b"orientation", b"spatial_frequency", b"phase"])
                s["data"] = np.stack([values, np.full(len(fs), 0.04), np.zeros(len(fs))], axis=1).astype(np.float32)
            elif task == "drifting_gratings":
                s["features"] = np.array([b"temporal_frequency", b"orientation", b"blank_sweep"])
                blank = np.isnan(values).astype(float)
                s["data"] = np.stack([np.full(len(fs), 2.0), values, blank], axis=1).astype(np.float32)
            else:
                s["data"] = np.asarray(values, dtype=np.int64)
    return path


def _ophys_inputs(seed: int = 0, n_frames: int = 900, n_rois: int = 7):
    rng = np.random.default_rng(seed)
    ts = 5.0 + np.arange(n_frames) / 30.0
    dff = rng.normal(size=(n_frames, n_rois)).astype(np.float32)
    roi_ids = rng.choice(10_000, n_rois, replace=False)
    frames = {
        "static_gratings": (np.arange(10) * 8, np.arange(10) * 8 + 7,
                            np.array([0, 30, np.nan, 60, 90, 120, 150, 0, 30, 60])),
        "drifting_gratings": (300 + np.arange(5) * 70, 300 + np.arange(5) * 70 + 60,
                              np.array([0, 45, np.nan, 270, 315])),
        "natural_scenes": (700 + np.arange(8) * 8, 700 + np.arange(8) * 8 + 7,
                           np.array([5, -1, 117, 0, 3, -1, 42, 7])),
    } if n_frames >= 800 else {}
    schedule = {k: (ts[fs], ts[fe], v) for k, (fs, fe, v) in frames.items()}
    return ts, dff, roi_ids, frames, schedule


def _read_trace(record) -> np.ndarray:
    return record.trace.read(0, len(record.trace.frame_times))


def _by_task(record) -> dict:
    return {iv.task: iv for iv in record.stimuli}


# ---- real files ----------------------------------------------------------------------------------
def _nwb_spikes(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        ids = f["units/id"][:]
        bounds = f["units/spike_times_index"][:]
        times = f["units/spike_times"][:]
    starts = np.r_[0, bounds[:-1]]
    return {str(i): np.sort(times[a:b]) for i, a, b in zip(ids, starts, bounds)}


@pytest.mark.parametrize("name", ["A8604-211122.nwb", "ecephys_tutorial_v2.5.0.nwb",
                                  "sub-anm369963_ses-20170228.nwb", "sub-anm372793_ses-20170508.nwb"])
def test_real_ephys_spikes_round_trip_exactly(name):
    expected = _nwb_spikes(REAL / name)
    with open_records(REAL / name, "s") as records:
        got = {}
        for rec in records:
            assert rec.modality == "ephys"
            assert rec.spike_times.dtype == np.float64 and rec.spike_units.dtype == np.int32
            assert np.all(np.diff(rec.spike_times) >= 0)
            assert rec.t_start == rec.spike_times[0] and rec.t_end == rec.spike_times[-1]
            for k, uid in enumerate(rec.unit_ids):
                got[uid] = rec.spike_times[rec.spike_units == k]
    assert got.keys() == expected.keys()
    for uid in expected:
        np.testing.assert_array_equal(got[uid], expected[uid])


def test_real_phy_file_without_locations_is_one_unknown_region_with_a_warning():
    with open_records(REAL / "A8604-211122.nwb", "A8604") as records:
        assert [(r.region, len(r.unit_ids)) for r in records] == [("unknown", 3)]
        rec = records[0]
        assert rec.unit_ids == ["6", "191", "206"]
        assert any("no usable location" in w for w in rec.warnings)
        assert rec.unit_meta["electrode_group"] == ["group0_psb"] * 3
        assert "spike_times" not in rec.unit_meta
        assert rec.stimuli == []  # its one 'wake' epoch spans the recording: not an event window


def test_real_tutorial_file_placeholder_brain_area_becomes_unknown():
    with open_records(REAL / "ecephys_tutorial_v2.5.0.nwb", "tut") as records:
        assert [(r.region, len(r.unit_ids)) for r in records] == [("unknown", 10)]
        rec = records[0]
        assert any("'brain area'" in w for w in rec.warnings)
        assert rec.unit_meta["quality"][0] == "good"
        assert "waveform_mean" not in rec.unit_meta
        assert rec.subject == ""


@pytest.mark.parametrize("name,subject,n_trials", [("sub-anm369963_ses-20170228.nwb", "anm369963", 178),
                                                   ("sub-anm372793_ses-20170508.nwb", "anm372793", 340)])
def test_real_dandi_000006_alm_compound_location_unsorted_spikes_and_nan_trial_stops(name, subject, n_trials):
    with open_records(REAL / name, "s") as records:
        assert [r.region for r in records] == ["ALM"]
        rec = records[0]
        assert rec.subject == subject
        assert rec.unit_meta["location_raw"][0].startswith("brain_region: ALM;")
        assert any("not sorted" in w for w in rec.warnings)
        assert any("NaN stop_time" in w for w in rec.warnings)
        [trials] = rec.stimuli
        assert trials.task == GENERIC_TASK and len(trials.start) == n_trials
        assert np.all(trials.label == -1)
        assert np.all(np.isfinite(trials.end)) and np.all(trials.end >= trials.start)
        assert np.all(np.diff(trials.start) >= 0)
        np.testing.assert_array_equal(trials.end[:-1], trials.start[1:])  # NaN stop -> next start


def test_real_allen_nwb1_skeleton_is_rejected_naming_the_placeholder():
    assert sniff(REAL / "496908818s.nwb") == Sniffed("nwb1_allen", "NWB-1.0.5")
    with pytest.raises(IngestError) as err:
        with open_records(REAL / "496908818s.nwb", "496908818"):
            pass
    msg = str(err.value)
    assert "DfOverF/imaging_plane_1/timestamps holds 1 values" in msg
    assert "num_samples is 113854" in msg and "placeholder" in msg


# ---- Allen-like EPhys ----------------------------------------------------------------------------
LOCS = {850000001: "VISp", 850000002: "VISp", 850000003: "LGd", 850000004: "", 850000005: "CA1"}


def _units(rng, n=8):
    channels = list(LOCS)
    return [{"id": 950000000 + k, "channel": channels[k % len(channels)],
             "spikes": np.sort(rng.uniform(0, 60, 20 + k))} for k in range(n)]


def test_neuropixels_session_gives_one_record_per_region_by_peak_channel(tmp_path):
    units = _units(np.random.default_rng(1), 8)
    path = neuropixels_like(tmp_path / "np.nwb", units, LOCS)
    expected = {}
    for u in units:
        region = LOCS[u["channel"]] or "unknown"
        expected.setdefault(region, []).append(str(u["id"]))
    with open_records(path, "sess") as records:
        assert [r.region for r in records] == sorted(expected)
        for rec in records:
            assert rec.unit_ids == expected[rec.region]
            assert rec.subject == "mouse1" and rec.session_id == "sess"
            sources = {"unknown": {"none"}}.get(rec.region, {"peak_channel_id->electrodes.location"})
            assert set(rec.unit_meta["region_source"]) == sources
            assert {"peak_channel_id", "quality", "firing_rate", "location_raw"} <= set(rec.unit_meta)
            assert "waveform_mean" not in rec.unit_meta
            for k, uid in enumerate(rec.unit_ids):
                src = next(u for u in units if str(u["id"]) == uid)
                np.testing.assert_array_equal(rec.spike_times[rec.spike_units == k], src["spikes"])
                assert rec.unit_meta["peak_channel_id"][k] == src["channel"]
        unknown = next(r for r in records if r.region == "unknown")
        assert any("no usable location" in w for w in unknown.warnings)


def test_neuropixels_stimulus_tables_become_labelled_intervals(tmp_path):
    path = neuropixels_like(tmp_path / "np.nwb", _units(np.random.default_rng(2)), LOCS)
    with open_records(path, "sess") as records:
        tasks = _by_task(records[0])
        assert set(tasks) == {"static_gratings", "drifting_gratings", "natural_scenes"}  # no generic rows
        sg = tasks["static_gratings"]  # NaN blank and the 45 deg (not a class) dropped
        np.testing.assert_array_equal(sg.label, labels_for(STATIC_GRATINGS, [0, 30, 60, 90, 120, 150, 0, 30]))
        np.testing.assert_allclose(sg.start, [0, 0.3, 0.9, 1.2, 1.5, 1.8, 2.1, 2.7])
        np.testing.assert_allclose(sg.end - sg.start, 0.25)
        dg = tasks["drifting_gratings"]  # strings with 'N/A' coerced; 8 direction classes
        np.testing.assert_array_equal(dg.label, [0, 1, 7, 2, 4])
        ns = tasks["natural_scenes"]  # -1 blanks kept as their own class
        np.testing.assert_array_equal(ns.label, [3, 118, 117, 0, 5])
        assert DRIFTING_GRATINGS.n_classes == 8 and NATURAL_SCENES.n_classes == 119
        assert all(r.stimuli == records[0].stimuli for r in records)
        assert any("outside the static_gratings classes" in w for w in records[0].warnings)


def test_units_without_spikes_nan_spikes_and_duplicate_ids(tmp_path):
    units = [{"id": 1, "channel": 850000001, "spikes": [0.5, np.nan, 0.2]},
             {"id": 2, "channel": 850000001, "spikes": []},
             {"id": 1, "channel": 850000001, "spikes": [0.1, 0.3]}]
    path = neuropixels_like(tmp_path / "u.nwb", units, LOCS, stimuli=False)
    with open_records(path, "s") as records:
        [rec] = records
        assert rec.region == "VISp"
        assert rec.unit_ids == ["1", "1_dup1"]
        np.testing.assert_array_equal(rec.spike_times, [0.1, 0.2, 0.3, 0.5])
        np.testing.assert_array_equal(rec.spike_units, [1, 0, 1, 0])
        text = " | ".join(rec.warnings)
        assert "units without spikes dropped: 2" in text
        assert "non-finite spike times dropped" in text
        assert "duplicated unit id '1'" in text
        assert "not sorted" in text


def test_units_all_without_spikes_is_an_ingest_error(tmp_path):
    units = [{"id": 1, "channel": 850000001, "spikes": []}, {"id": 2, "channel": 850000003, "spikes": []}]
    path = neuropixels_like(tmp_path / "empty.nwb", units, LOCS, stimuli=False)
    with pytest.raises(IngestError, match="no unit has spike times"):
        with open_records(path, "s"):
            pass


# ---- OPhys: NWB 2 (000728 layout) and NWB 1 (Allen) ---------------------------------------------
def test_ophys_000728_layout_reads_dff_lazily_with_plane_region_and_tasks(tmp_path):
    ts, dff, roi_ids, _, schedule = _ophys_inputs()
    path = ophys_000728_like(tmp_path / "o.nwb", dff, ts, roi_ids, "VISal", schedule)
    with open_records(path, "exp1") as records:
        [rec] = records
        assert (rec.modality, rec.region, rec.subject) == ("ophys", "VISal", "specimen7")
        assert rec.unit_ids == [str(r) for r in roi_ids]
        assert rec.unit_meta["global_roi_id"] == [1000 + int(r) for r in roi_ids]
        assert isinstance(rec.trace, ArrayTrace) and isinstance(rec.trace.data, h5py.Dataset)
        np.testing.assert_array_equal(rec.trace.frame_times, ts)
        np.testing.assert_array_equal(rec.trace.read(100, 110), dff[100:110])
        assert (rec.t_start, rec.t_end) == (ts[0], ts[-1])
        assert rec.warnings == []
        tasks = _by_task(rec)
        np.testing.assert_array_equal(tasks["static_gratings"].label, [0, 1, 2, 3, 4, 5, 0, 1, 2])
        np.testing.assert_array_equal(tasks["drifting_gratings"].label, [0, 1, 6, 7])
        np.testing.assert_array_equal(tasks["natural_scenes"].label, [5, 118, 117, 0, 3, 118, 42, 7])


def test_ophys_nwb1_and_nwb2_give_the_same_record(tmp_path):
    ts, dff, roi_ids, frames, schedule = _ophys_inputs(seed=3)
    p2 = ophys_000728_like(tmp_path / "o2.nwb", dff, ts, roi_ids, "VISpm", schedule)
    p1 = allen_nwb1_like(tmp_path / "o1.nwb", dff, ts, roi_ids, "VISpm", frames)
    with open_records(p1, "e") as r1, open_records(p2, "e") as r2:
        [a], [b] = r1, r2
        assert a.trace.units_first and not b.trace.units_first
        for field in ("modality", "region", "subject", "unit_ids", "t_start", "t_end"):
            assert getattr(a, field) == getattr(b, field), field
        assert a.unit_meta["global_roi_id"] == b.unit_meta["global_roi_id"]
        np.testing.assert_array_equal(a.trace.frame_times, b.trace.frame_times)
        np.testing.assert_array_equal(_read_trace(a), _read_trace(b))
        np.testing.assert_array_equal(_read_trace(a), dff)
        assert a.tasks == b.tasks == ["drifting_gratings", "natural_scenes", "static_gratings"]
        for x, y in zip(a.stimuli, b.stimuli):
            assert x.task == y.task
            np.testing.assert_array_equal(x.label, y.label)
            np.testing.assert_array_equal(x.start, y.start)
        # NWB1 ends come from frame_duration; 000728 scenes have onsets only (0.25 s)
        np.testing.assert_array_equal(_by_task(a)["static_gratings"].end, _by_task(b)["static_gratings"].end)


def test_nwb1_num_samples_larger_than_data_is_rejected(tmp_path):
    ts, dff, roi_ids, _, _ = _ophys_inputs(n_frames=50)
    path = allen_nwb1_like(tmp_path / "short.nwb", dff, ts, roi_ids, num_samples=5000)
    with pytest.raises(IngestError, match=r"timestamps holds 50 values but .*num_samples is 5000"):
        with open_records(path, "s"):
            pass


def test_non_allen_nwb1_is_rejected(tmp_path):
    path = tmp_path / "other.nwb"
    with h5py.File(path, "w") as f:
        f["nwb_version"] = np.bytes_("NWB-1.0.3")
        f.create_group("processing/my_pipeline")
    with pytest.raises(IngestError, match="unsupported NWB 1 layout"):
        with open_records(path, "s"):
            pass


def test_fluorescence_without_dff_is_used_with_a_warning(tmp_path):
    ts, dff, roi_ids, _, _ = _ophys_inputs(n_frames=60)
    path = ophys_000728_like(tmp_path / "f.nwb", dff, ts, roi_ids, container="Fluorescence")
    with open_records(path, "s") as records:
        [rec] = records
        assert "no DfOverF; using Fluorescence Corrected (not dF/F)" in rec.warnings
        np.testing.assert_allclose(_read_trace(rec), dff + 1.0)


def test_rate_only_series_gets_computed_frame_times(tmp_path):
    ts, dff, roi_ids, _, _ = _ophys_inputs(n_frames=60)
    path = ophys_000728_like(tmp_path / "r.nwb", dff, ts, roi_ids, rate=30.0)
    with open_records(path, "s") as records:
        np.testing.assert_allclose(records[0].trace.frame_times, ts)


def test_all_nan_dff_is_an_ingest_error_but_some_nan_is_kept(tmp_path):
    ts, dff, roi_ids, _, _ = _ophys_inputs(n_frames=60)
    path = ophys_000728_like(tmp_path / "nan.nwb", np.full_like(dff, np.nan), ts, roi_ids)
    with pytest.raises(IngestError, match="all NaN"):
        with open_records(path, "s"):
            pass
    part = dff.copy()
    part[10:20, 2] = np.nan
    path = ophys_000728_like(tmp_path / "some_nan.nwb", part, ts, roi_ids)
    with open_records(path, "s") as records:
        assert np.isnan(_read_trace(records[0])).sum() == 10


def test_decreasing_timestamps_are_an_ingest_error(tmp_path):
    ts, dff, roi_ids, _, _ = _ophys_inputs(n_frames=60)
    ts = ts.copy()
    ts[[20, 21]] = ts[[21, 20]]
    path = ophys_000728_like(tmp_path / "nm.nwb", dff, ts, roi_ids)
    with pytest.raises(IngestError, match="non-monotonic timestamps in .*DfOverF.* first at frame 21"):
        with open_records(path, "s"):
            pass


def test_repeated_timestamps_drop_frames_and_read_the_right_rows(tmp_path):
    ts, dff, roi_ids, _, _ = _ophys_inputs(n_frames=60)
    ts = ts.copy()
    ts[31] = ts[30]
    path = ophys_000728_like(tmp_path / "dup.nwb", dff, ts, roi_ids)
    with open_records(path, "s") as records:
        rec = records[0]
        keep = np.r_[0:31, 32:60]
        np.testing.assert_array_equal(rec.trace.frame_times, ts[keep])
        np.testing.assert_array_equal(_read_trace(rec), dff[keep])
        np.testing.assert_array_equal(rec.trace.read(29, 33), dff[[29, 30, 32, 33]])
        assert any("repeated timestamps dropped" in w for w in rec.warnings)


# ---- files that cannot be ingested --------------------------------------------------------------
def test_truncated_file_cannot_be_opened(tmp_path):
    path = tmp_path / "trunc.nwb"
    shutil.copy(REAL / "A8604-211122.nwb", path)
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(IngestError, match="cannot open file as HDF5"):
        with open_records(path, "s"):
            pass


def test_text_file_named_nwb_cannot_be_opened(tmp_path):
    path = tmp_path / "notes.nwb"
    path.write_text("not an HDF5 file\n")
    with pytest.raises(IngestError, match="cannot open file as HDF5"):
        with open_records(path, "s"):
            pass


def test_hdf5_that_is_not_nwb_is_rejected(tmp_path):
    path = tmp_path / "plain.nwb"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(IngestError, match="not NWB"):
        with open_records(path, "s"):
            pass


def test_nwb_without_units_or_roi_traces_is_rejected(tmp_path):
    from pynwb import TimeSeries

    nwb = _nwbfile()
    nwb.add_acquisition(TimeSeries(name="running", data=np.zeros(10), unit="cm/s", rate=10.0))
    path = _write(nwb, tmp_path / "nothing.nwb")
    with pytest.raises(IngestError, match="no units with spike times and no ROI response series"):
        with open_records(path, "s"):
            pass


# ---- generic files -------------------------------------------------------------------------------
def test_generic_file_trials_and_other_tables_become_unlabelled_windows_but_not_epochs(tmp_path):
    nwb = _nwbfile()
    nwb.add_unit_column("location", "where")
    nwb.add_unit(id=3, spike_times=[1.0, 2.0, 9.5], location="brain_region: CA1; cortical_layer: N/A")
    nwb.add_unit(id=4, spike_times=[0.5], location="unknown")
    for a in (1.0, 4.0, 7.0):
        nwb.add_trial(start_time=a, stop_time=a + 2.0)
    nwb.add_epoch(start_time=0.0, stop_time=10.0, tags=["awake"])
    _add_presentations(nwb, "odor_presentations", [5.5, 0.2], [6.0, 0.4])
    path = _write(nwb, tmp_path / "generic.nwb")
    with open_records(path, "g") as records:
        assert [(r.region, r.unit_ids) for r in records] == [("CA1", ["3"]), ("unknown", ["4"])]
        assert records[0].unit_meta["region_source"] == ["units.location"]
        assert (records[0].t_start, records[0].t_end) == (1.0, 9.5)
        [iv] = records[0].stimuli
        assert iv.task == GENERIC_TASK
        np.testing.assert_array_equal(iv.start, [0.2, 1.0, 4.0, 5.5, 7.0])
        np.testing.assert_array_equal(iv.end, [0.4, 3.0, 6.0, 6.0, 9.0])
        np.testing.assert_array_equal(iv.label, -1)


def test_records_are_valid_only_inside_the_with_block(tmp_path):
    ts, dff, roi_ids, _, _ = _ophys_inputs(n_frames=60)
    path = ophys_000728_like(tmp_path / "o.nwb", dff, ts, roi_ids)
    with open_records(path, "s") as records:
        trace = records[0].trace
        assert trace.read(0, 2).shape == (2, len(roi_ids))
    with pytest.raises(OSError):  # h5py: the file is closed
        trace.read(0, 2)


# ---- the synthetic Allen-like corpus (ingest.synth) ---------------------------------------------
@pytest.fixture(scope="module")
def synth_corpus(tmp_path_factory):
    """One small corpus per OPhys format, same seed: {format: [ephys path, ophys path]}."""
    synth = pytest.importorskip("ingest.synth")
    config = synth.SynthConfig(duration_s=120.0, units_per_region=6, rois_per_plane=8)
    root = tmp_path_factory.mktemp("synth")
    return {fmt: synth.synthesize(root / fmt, sessions=2, seed=7, ophys_format=fmt, config=config)
            for fmt in ("nwb2", "nwb1")}


def _truth(path):
    from ingest.synth import SessionTruth

    return SessionTruth.load(path)


def _truth_intervals(truth, task: str):
    from shards.schema import UNLABELLED

    s = truth.schedule
    m = s.mask(task) & (s.label != UNLABELLED)
    return s.start[m], s.end[m], s.label[m]


def test_synth_ephys_session_gives_one_record_per_region_with_the_truth_units(synth_corpus):
    from ingest.regions import region_name

    path = synth_corpus["nwb2"][0]
    truth = _truth(path)
    expected: dict[str, list[str]] = {}
    for uid, loc in zip(truth.unit_ids, truth.unit_location):
        expected.setdefault(region_name(loc), []).append(str(uid))
    assert len([r for r in expected if r != "unknown"]) >= 3
    spikes = _nwb_spikes(path)
    with open_records(path, truth.session_id) as records:
        assert {r.region: r.unit_ids for r in records} == {k: v for k, v in expected.items()}
        for rec in records:
            assert rec.modality == "ephys" and rec.session_id == truth.session_id
            for k, uid in enumerate(rec.unit_ids):
                np.testing.assert_array_equal(rec.spike_times[rec.spike_units == k], spikes[uid])


@pytest.mark.parametrize("fmt", ["nwb2", "nwb1"])
def test_synth_three_tasks_have_the_truth_schedule_labels(synth_corpus, fmt):
    for path in synth_corpus[fmt]:
        truth = _truth(path)
        frame = 1.0 / truth.config.frame_rate_hz + 1e-3
        with open_records(path, truth.session_id) as records:
            for rec in records:
                tasks = _by_task(rec)
                assert sorted(tasks) == ["drifting_gratings", "natural_scenes", "static_gratings"]
                for name, iv in tasks.items():
                    start, stop, label = _truth_intervals(truth, name)
                    np.testing.assert_array_equal(iv.label, label, err_msg=f"{path.name} {name}")
                    exact = rec.modality == "ephys" or fmt == "nwb2"
                    np.testing.assert_allclose(iv.start, start, atol=1e-9 if exact else frame)
                    np.testing.assert_allclose(iv.end, stop, atol=1e-9 if exact else frame)


def test_synth_ophys_nwb2_and_nwb1_give_the_same_record(synth_corpus):
    p2, p1 = synth_corpus["nwb2"][1], synth_corpus["nwb1"][1]
    truth = _truth(p2)
    with open_records(p2, truth.session_id) as r2, open_records(p1, truth.session_id) as r1:
        [b], [a] = r2, r1
        for field in ("modality", "region", "subject", "unit_ids", "t_start", "t_end"):
            assert getattr(a, field) == getattr(b, field), field
        assert b.unit_ids == [str(u) for u in truth.unit_ids]
        assert b.region == truth.unit_location[0]
        assert a.unit_meta["global_roi_id"] == b.unit_meta["global_roi_id"]
        np.testing.assert_array_equal(a.trace.frame_times, truth.frame_times)
        np.testing.assert_array_equal(b.trace.frame_times, truth.frame_times)
        np.testing.assert_array_equal(_read_trace(a), _read_trace(b))
        np.testing.assert_array_equal(a.trace.read(100, 140), b.trace.read(100, 140))
        assert a.tasks == b.tasks
        for x, y in zip(a.stimuli, b.stimuli):
            np.testing.assert_array_equal(x.label, y.label)
        assert a.warnings == b.warnings == []
