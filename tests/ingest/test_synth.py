"""The synthetic corpus: real NWB files in the Allen layouts, deterministic, with ground truth and a known optimum."""

from __future__ import annotations

import json
import re
import subprocess
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from ingest.synth import SessionTruth, SynthConfig, bayes_accuracy, synthesize
from ingest.synth.corpus import main
from ingest.synth.generative import class_rates, poisson_class_loglik
from shards.schema import TASKS
from tests.support import REPO

ALLEN_PYTHON = REPO / ".venv-allen" / "bin" / "python"
SHORT = SynthConfig(duration_s=60.0, units_per_region=8, rois_per_plane=10)
TASK_NAMES = ("static_gratings", "drifting_gratings", "natural_scenes")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """Default-sized corpus: one EPhys session (3 regions) and one NWB 2 OPhys experiment."""
    return synthesize(tmp_path_factory.mktemp("synth"), sessions=2, seed=0)


@pytest.fixture(scope="module")
def nwb1_file(tmp_path_factory) -> Path:
    paths = synthesize(tmp_path_factory.mktemp("synth_nwb1"), sessions=2, seed=1, ophys_format="nwb1",
                       config=SynthConfig(duration_s=120.0, rois_per_plane=12))
    return paths[1]


def read_pynwb(path: Path):
    from pynwb import NWBHDF5IO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        io = NWBHDF5IO(str(path), "r")
        return io, io.read()


def spike_trains(path: Path) -> tuple[np.ndarray, list[np.ndarray]]:
    with h5py.File(path, "r") as f:
        ids, idx, st = f["units/id"][:], f["units/spike_times_index"][:], f["units/spike_times"][:]
    return ids, [st[(idx[i - 1] if i else 0):idx[i]] for i in range(len(idx))]


def npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(f"{path.with_suffix('')}.truth.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_sessions_alternate_ephys_and_ophys_with_safe_names(corpus):
    assert [p.name for p in corpus] == ["ephys_synth-ephys-000.nwb", "ophys_synth-ophys-001.nwb"]
    for p in corpus:
        assert re.fullmatch(r"(ephys|ophys)_synth-(ephys|ophys)-\d{3}\.nwb", p.name)
        assert Path(f"{p.with_suffix('')}.truth.json").is_file() and Path(f"{p.with_suffix('')}.truth.npz").is_file()
    assert not list(corpus[0].parent.glob("*.tmp")) and not list(corpus[0].parent.glob("*.part"))  # temp files gone


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    a = synthesize(tmp_path / "a", sessions=2, seed=7, config=SHORT)
    b = synthesize(tmp_path / "b", sessions=2, seed=7, config=SHORT)
    c = synthesize(tmp_path / "c", sessions=2, seed=8, config=SHORT)
    for x, y in zip(a, b):
        assert x.read_bytes() == y.read_bytes()  # fixed clocks and object ids: byte-identical NWB files
        ax, ay = npz_arrays(x), npz_arrays(y)
        assert ax.keys() == ay.keys()
        assert all(np.array_equal(ax[k], ay[k], equal_nan=ax[k].dtype.kind == "f") for k in ax)
    (_, ta), (_, tc) = spike_trains(a[0]), spike_trains(c[0])
    assert not all(len(u) == len(v) and np.array_equal(u, v) for u, v in zip(ta, tc))
    with h5py.File(a[1], "r") as fa, h5py.File(c[1], "r") as fc:
        assert not np.array_equal(fa["processing/ophys/DfOverF/DfOverF/data"][:], fc["processing/ophys/DfOverF/DfOverF/data"][:])


def test_adding_sessions_leaves_earlier_sessions_unchanged(tmp_path):
    one = synthesize(tmp_path / "one", sessions=1, seed=3, config=SHORT)
    three = synthesize(tmp_path / "three", sessions=3, seed=3, config=SHORT)
    assert one[0].read_bytes() == three[0].read_bytes()


def test_ephys_file_has_the_allen_neuropixels_layout_and_spans_several_regions(corpus):
    io, nwb = read_pynwb(corpus[0])
    try:
        el = nwb.electrodes
        for col in ("location", "group", "group_name", "probe_vertical_position", "probe_horizontal_position",
                    "probe_id", "local_index", "valid_data", "x", "y", "z"):
            assert col in el.colnames
        el_ids = np.asarray(el.id.data[:])
        assert el_ids.min() > 8.4e8 and el_ids.max() < 8.6e8
        locations = [str(v) for v in el["location"].data[:]]
        named = {v for v in locations if v.startswith("VIS")}
        assert len(named) == 3 and "grey" in locations and "" in locations
        assert sorted(nwb.devices) == ["probeA", "probeB", "probeC"]
        assert sorted(nwb.electrode_groups) == ["probeA", "probeB", "probeC"]

        units = nwb.units
        assert "electrodes" not in units.colnames
        for col in ("peak_channel_id", "cluster_id", "local_index", "quality", "firing_rate", "isi_violations",
                    "presence_ratio", "amplitude_cutoff", "snr", "spike_times", "spike_amplitudes"):
            assert col in units.colnames
        unit_ids = np.asarray(units.id.data[:])
        assert unit_ids.min() > 9.4e8 and unit_ids.max() < 9.6e8
        peak = np.asarray(units["peak_channel_id"].data[:])
        assert set(peak) <= set(el_ids)
        unit_regions = {locations[int(np.flatnonzero(el_ids == p)[0])] for p in peak}
        assert named <= unit_regions and {"grey", ""} <= unit_regions

        for name in ("static_gratings_presentations", "drifting_gratings_presentations",
                     "natural_scenes_presentations", "spontaneous_presentations"):
            assert name in nwb.intervals
        sg = nwb.intervals["static_gratings_presentations"]
        for col in ("stimulus_name", "stimulus_block", "stimulus_index", "orientation", "spatial_frequency", "phase", "size"):
            assert col in sg.colnames
        assert str(sg["size"].data[0]) == "[250.0, 250.0]"
        assert np.isnan(sg["orientation"].data[:]).any()  # blank sweeps
        assert "temporal_frequency" in nwb.intervals["drifting_gratings_presentations"].colnames
        frames = np.asarray(nwb.intervals["natural_scenes_presentations"]["frame"].data[:])
        assert frames.min() == -1 and frames.max() <= 117
    finally:
        io.close()


def test_ophys_nwb2_file_has_the_dandi_000728_layout(corpus):
    io, nwb = read_pynwb(corpus[1])
    try:
        plane = nwb.imaging_planes["ImagingPlane"]
        assert plane.location == "VISp" and "Microscope" in nwb.devices
        ophys = nwb.processing["ophys"]
        ps = ophys["ImageSegmentation"]["PlaneSegmentation"]
        assert "global_roi_id" in ps.colnames
        dff = ophys["DfOverF"]["DfOverF"]
        n_frames = len(dff.timestamps[:])
        assert dff.data.shape == (n_frames, 40) and dff.data.dtype == np.float32
        assert 29.0 < 1.0 / np.median(np.diff(dff.timestamps[:])) < 31.0
        assert {"Corrected", "Neuropil"} <= set(ophys["Fluorescence"].roi_response_series)
        sg = nwb.stimulus["static_gratings"].to_dataframe()
        assert {"orientation_in_degrees", "spatial_frequency_in_cycles_per_degree", "phase", "is_blank_sweep"} <= set(sg)
        assert sg.is_blank_sweep.any() and np.isnan(sg.orientation_in_degrees[sg.is_blank_sweep]).all()
        assert "temporal_frequency_in_hz" in nwb.stimulus["drifting_gratings"].colnames
        ns = nwb.stimulus["natural_scenes_stimulus"]
        assert ns.data.dtype == np.uint32 and (ns.data[:] == 2**32 - 1).any()
        assert len(nwb.stimulus_template["natural_scenes_template"].images) == 118
        assert "stimulus_type" in nwb.epochs.colnames
    finally:
        io.close()
    with h5py.File(corpus[1], "r") as f:
        link = f["processing/ophys/DfOverF/DfOverF"].get("timestamps", getlink=True)
        assert isinstance(link, h5py.SoftLink) and link.path == "/processing/ophys/Fluorescence/Corrected/timestamps"


def test_ophys_nwb1_file_has_the_allen_brain_observatory_layout(nwb1_file):
    with h5py.File(nwb1_file, "r") as f:
        assert f["nwb_version"][()] == b"NWB-1.0.5" and "nwb_version" not in f.attrs
        region = f["general/targeted_structure"][()]
        assert region == f["general/optophysiology/imaging_plane_1/location"][()] == b"VISp"
        dff = f["processing/brain_observatory_pipeline/DfOverF/imaging_plane_1"]
        n_frames = len(dff["timestamps"])
        assert dff["data"].shape == (12, n_frames)  # ROIs x frames
        assert int(dff["num_samples"][()]) == n_frames and dff["roi_names"].dtype.kind == "S"
        assert f["processing/brain_observatory_pipeline/ImageSegmentation/cell_specimen_ids"].shape == (12,)
        for name, features in (("static_gratings", [b"orientation", b"spatial_frequency", b"phase"]),
                               ("drifting_gratings", [b"temporal_frequency", b"orientation", b"blank_sweep"])):
            g = f[f"stimulus/presentation/{name}_stimulus"]
            assert list(g["features"][()]) == features and g["data"].shape == (len(g["timestamps"]), 3)
            fd = g["frame_duration"][()]
            assert fd.shape == (len(g["timestamps"]), 2) and fd.max() < n_frames
        ns = f["stimulus/presentation/natural_scenes_stimulus"]
        assert (ns["data"][()] == -1).any() and ns["frame_duration"].shape == (len(ns["data"]), 2)
        # the three free-text fields AllenSDK parses
        assert re.match(r"(.*?)\.\s(.*?)\sPlease*", f["general/devices/2-photon microscope"][()].decode())
        assert re.match(r"(.*?) days", f["general/subject/age"][()].decode())
        assert f["general/generated_by"][-1] == b"3.0"


def test_ground_truth_loads_without_pickle_and_matches_the_files(corpus):
    eph, oph = (SessionTruth.load(p) for p in corpus)
    meta = json.loads(Path(f"{corpus[0].with_suffix('')}.truth.json").read_text())
    assert meta["config"]["duration_s"] == 300.0 and "VISp" in meta["region_params"]
    assert len(meta["units"]) == len(eph.unit_ids)
    ids, trains = spike_trains(corpus[0])
    assert np.array_equal(ids, eph.unit_ids) and len(ids) == 3 * 30 + 4
    with h5py.File(corpus[0], "r") as f:
        el_ids = f["general/extracellular_ephys/electrodes/id"][:]
        locs = f["general/extracellular_ephys/electrodes/location"].asstr()[:]
        peak = f["units/peak_channel_id"][:]
        assert [locs[np.flatnonzero(el_ids == p)[0]] for p in peak] == list(eph.unit_location)
        for task in TASK_NAMES:
            m = eph.schedule.mask(task)
            assert np.array_equal(f[f"intervals/{task}_presentations/start_time"][:], eph.schedule.start[m])
    with h5py.File(corpus[1], "r") as f:
        assert np.array_equal(f["processing/ophys/Fluorescence/Corrected/timestamps"][:], oph.frame_times)
        assert np.array_equal(f["processing/ophys/ImageSegmentation/PlaneSegmentation/id"][:], oph.unit_ids)
        assert np.array_equal(f["stimulus/presentation/static_gratings/start_time"][:],
                              oph.schedule.start[oph.schedule.mask("static_gratings")])
    assert set(oph.ophys) == {"tau_decay_s", "amplitude", "noise"}
    # every session shows all three tasks, separated by spontaneous gaps
    assert {str(n) for n in eph.schedule.epoch_name} == set(TASK_NAMES) | {"spontaneous"}


def test_readers_recover_regions_and_labels_of_the_ground_truth(corpus):
    from ingest.readers import open_records

    truth = SessionTruth.load(corpus[0])
    with open_records(corpus[0], "synth-ephys-000") as records:
        by_region = {r.region: r for r in records}
        assert set(by_region) == {str(v) for v in truth.unit_location if v} | {"unknown"}
        for task in TASK_NAMES:
            iv = next(iv for iv in by_region["VISp"].stimuli if iv.task == task)
            m = truth.schedule.mask(task) & (truth.schedule.label >= 0)
            assert np.array_equal(iv.label, truth.schedule.label[m]) and np.allclose(iv.start, truth.schedule.start[m])
    with open_records(corpus[1], "synth-ophys-001") as records:
        (rec,) = records
        assert rec.modality == "ophys" and rec.region == "VISp" and len(rec.unit_ids) == 40


def test_optimal_poisson_decoder_beats_chance_clearly(corpus):
    truth = SessionTruth.load(corpus[0])
    _, trains = spike_trains(corpus[0])
    for task in TASK_NAMES:
        chance = 1.0 / TASKS[task].n_classes
        acc = bayes_accuracy(truth, trains, task)
        assert acc > max(0.5, 5 * chance), (task, acc)
        visp = np.flatnonzero(truth.unit_location == "VISp")
        assert bayes_accuracy(truth, trains, task, units=visp) > 2 * chance
    # shuffled labels: the same decoder is at chance
    shuffled = SessionTruth.load(corpus[0])
    m = shuffled.schedule.mask("static_gratings") & (shuffled.schedule.label >= 0)
    shuffled.schedule.label[m] = np.random.default_rng(0).permutation(shuffled.schedule.label[m])
    assert bayes_accuracy(shuffled, trains, "static_gratings") < 0.35


def test_poisson_loglik_prefers_the_class_whose_rates_produced_the_counts():
    rates = np.array([[1.0, 10.0, 5.0], [8.0, 1.0, 5.0]])  # 2 units x 3 classes
    counts = np.array([[1, 8], [10, 1], [5, 5]])  # expected counts of classes 0, 1, 2 over 1 s
    ll = poisson_class_loglik(counts, rates, np.ones(3))
    assert ll.shape == (3, 3) and list(ll.argmax(axis=1)) == [0, 1, 2]


def test_ophys_dff_carries_the_stimulus_rates(corpus):
    truth = SessionTruth.load(corpus[1])
    with h5py.File(corpus[1], "r") as f:
        dff = f["processing/ophys/DfOverF/DfOverF/data"][:]
    s = truth.schedule
    m = s.mask("drifting_gratings") & (s.label >= 0)
    ft = truth.frame_times
    rates = class_rates(truth.units, truth.model, "drifting_gratings")[:, s.label[m]]  # (rois, presentations)
    means = np.stack([dff[(ft >= a + 0.1) & (ft < b + 0.5)].mean(axis=0) for a, b in zip(s.start[m], s.end[m])], axis=1)
    r = [np.corrcoef(rates[j], means[j])[0, 1] for j in range(rates.shape[0]) if rates[j].std() > 0.2]
    assert np.median(r) > 0.5
    assert dff.dtype == np.float32 and np.isfinite(dff).all()


def test_cli_writes_the_corpus_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["--out", str(out), "--sessions", "2", "--seed", "4", "--duration", "60", "--units", "5",
               "--regions", "VISp,VISl", "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in out.glob("*.nwb")) == ["ephys_synth-ephys-000.nwb", "ophys_synth-ophys-001.nwb"]
    text = capsys.readouterr().out
    assert re.search(r"file\s+modality\s+regions\s+units\s+duration\s+MB", text)
    assert re.search(r"ephys_synth-ephys-000\.nwb\s+ephys\s+VISp,VISl\s+14\s+60 s", text)
    assert "2 sessions (1 ephys, 1 ophys)" in text
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "(default: 6)" in capsys.readouterr().out
    assert main(["--out", str(out), "--sessions", "0"]) == 2


ALLENSDK_CHECK = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
import numpy as np
from allensdk.core.brain_observatory_nwb_data_set import BrainObservatoryNwbDataSet
ds = BrainObservatoryNwbDataSet(sys.argv[1])
meta = ds.get_metadata()
ts, dff = ds.get_dff_traces()
out = {"meta": {k: meta.get(k) for k in ("targeted_structure", "ophys_experiment_id", "age_days", "device",
                                          "device_name", "pipeline_version", "imaging_depth_um")},
       "dff_shape": list(dff.shape), "dff_sum": float(np.asarray(dff, dtype=np.float64).sum()), "n_ts": len(ts),
       "cells": [int(c) for c in ds.get_cell_specimen_ids()], "tables": {}}
for name in ("static_gratings", "drifting_gratings", "natural_scenes"):
    t = ds.get_stimulus_table(name)
    col = "frame" if name == "natural_scenes" else "orientation"
    out["tables"][name] = {"columns": list(t.columns), "start": t["start"].astype(int).tolist(),
                           "values": [None if v != v else float(v) for v in t[col]]}
print(json.dumps(out))
"""


@pytest.mark.slow
@pytest.mark.skipif(not ALLEN_PYTHON.exists(), reason="no .venv-allen (create it with `make allen-env`)")
def test_allensdk_reads_the_synthetic_nwb1_file(nwb1_file):
    proc = subprocess.run([str(ALLEN_PYTHON), "-c", ALLENSDK_CHECK, str(nwb1_file)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    truth = SessionTruth.load(nwb1_file)
    assert got["meta"] == {"targeted_structure": "VISp", "ophys_experiment_id": 700_000_001, "age_days": 90,
                           "device": "Synthetic two-photon microscope", "device_name": "SYNTH2P.1",
                           "pipeline_version": "3.0", "imaging_depth_um": 275}
    with h5py.File(nwb1_file, "r") as f:
        dff = f["processing/brain_observatory_pipeline/DfOverF/imaging_plane_1/data"][:]
    assert got["dff_shape"] == list(dff.shape) and got["n_ts"] == len(truth.frame_times)
    assert got["dff_sum"] == pytest.approx(float(dff.astype(np.float64).sum()), rel=1e-9)
    assert got["cells"] == [int(c) for c in 517_001_000 + np.arange(12)]
    s = truth.schedule
    for name in TASK_NAMES:
        table = got["tables"][name]
        assert {"start", "end"} <= set(table["columns"])
        m = s.mask(name)
        expected = s.frame[m] if name == "natural_scenes" else s.orientation[m]
        assert len(table["values"]) == int(m.sum())
        assert [None if np.isnan(v) else float(v) for v in expected] == table["values"]
        assert table["start"] == list(np.minimum(np.searchsorted(truth.frame_times, s.start[m]), len(truth.frame_times) - 1))
