"""``synthesize``: a seeded corpus of NWB files in the public Allen layouts, with their ground truth.

Why: CI and demos need both modalities, several regions per EPhys session, all three tasks and
every layout the readers support, without network access, in seconds; and a known optimum to
judge training runs against. Session ``k`` is EPhys for even ``k`` and OPhys for odd ``k``; EPhys
session ``e`` records ``regions_per_ephys`` regions (rotating through ``config.regions``), OPhys
experiment ``o`` images region ``regions[o % len(regions)]``. Every random draw comes from a
stream keyed by (seed, purpose, session index), so a session's arrays do not depend on how many
sessions are made, and the same seed gives the same arrays.

Files per session in ``out_dir``: ``<modality>_<session_id>.nwb`` plus ``<stem>.truth.json`` and
``<stem>.truth.npz`` (see :class:`ingest.synth.generative.SessionTruth`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ingest.synth.generative import (
    STREAM_CORPUS,
    STREAM_LAYOUT,
    STREAM_SCHEDULE,
    STREAM_SPIKES,
    STREAM_UNITS,
    UNASSIGNED,
    CorpusModel,
    SessionTruth,
    SynthConfig,
    UnitParams,
    calcium_kernel,
    dff_traces,
    draw_corpus_model,
    draw_units,
    ephys_model,
    expected_counts,
    frame_times,
    piecewise_rates,
    poisson_spikes,
    presentation_rates,
    rng_for,
)
from ingest.synth.schedule import N_IMAGES, Schedule, build_schedule
from ingest.synth.write_ephys import probe_layout, write_ephys_nwb
from ingest.synth.write_ophys_nwb1 import write_ophys_nwb1
from ingest.synth.write_ophys_nwb2 import OphysData, write_ophys_nwb2
from shards.atomic import atomic_path

OphysFormat = Literal["nwb2", "nwb1"]

#: Named corpus configurations. ``default``: small and fast (demo, tests; must never change).
#: ``science``: the benchmark corpus (docs/results.md): realistic unit counts and rates, every task
#: between 0.5 and 0.9 for the ideal observer, OPhys harder than EPhys, >= 10 train presentations
#: per natural scene per session. Its values were set by measuring ``ingest.synth.ideal``.
PRESETS: dict[str, SynthConfig] = {
    "default": SynthConfig(),
    "science": SynthConfig(
        preset="science", duration_s=1200.0, units_per_region=60, unassigned_units=0, rois_per_plane=200,
        region_spread=0.25,
        time_share={"drifting_gratings": 0.3, "static_gratings": 0.2, "natural_scenes": 0.5},
        task_strength={"static_gratings": 0.55, "drifting_gratings": 0.2, "natural_scenes": 1.4},
        ophys_task_strength={"static_gratings": 1.0, "drifting_gratings": 0.9, "natural_scenes": 1.05},
        ophys_baseline_hz=0.3, ophys_gain_hz=1.2, dff_noise=0.12,
    ),
}


def preset_config(name: str, **overrides) -> SynthConfig:
    """A fresh copy of preset ``name`` with some fields replaced (ValueError naming the presets if unknown)."""
    import dataclasses

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)
#: Fixed clock for session_start_time / file_create_date, so reruns write identical files.
EPOCH = dt.datetime(2019, 1, 7, 9, 0, 0, tzinfo=dt.timezone.utc)
TEMPLATE_SHAPE = (16, 24)


@dataclass
class SessionSummary:
    """One written session, for the CLI table and for callers."""

    path: Path
    session_id: str
    modality: str
    regions: list[str]
    n_units: int
    duration_s: float

    @property
    def megabytes(self) -> float:
        return self.path.stat().st_size / 1e6


def _spike_trains(units: UnitParams, stim_rates: np.ndarray, schedule: Schedule,
                  rng: np.random.Generator) -> list[np.ndarray]:
    """Poisson trains of every unit; units are grouped by latency because each latency shifts the pieces."""
    trains: list[np.ndarray] = [np.zeros(0)] * len(units.gain)
    for lat in np.unique(units.latency_s):
        idx = np.flatnonzero(units.latency_s == lat)
        edges, rates = piecewise_rates(schedule, stim_rates[idx], units.baseline[idx], float(lat))
        for i, t in zip(idx, poisson_spikes(edges, rates, rng)):
            trains[i] = t
    return trains


def frame_bins(times: np.ndarray, rate_hz: float) -> np.ndarray:
    """Edges of the imaging frames' count bins: frame k counts the spikes in [times[k], times[k+1])."""
    return np.concatenate([times, [times[-1] + 1.0 / rate_hz]])


def frame_means(units: UnitParams, stim_rates: np.ndarray, schedule: Schedule, times: np.ndarray,
                rate_hz: float) -> np.ndarray:
    """(n_frames, n_rois) expected spike count per imaging frame, given each presentation's rates."""
    bins = frame_bins(times, rate_hz)
    mu = np.zeros((len(times), len(units.gain)))
    for lat in np.unique(units.latency_s):
        idx = np.flatnonzero(units.latency_s == lat)
        edges, rates = piecewise_rates(schedule, stim_rates[idx], units.baseline[idx], float(lat))
        mu[:, idx] = expected_counts(edges, rates, bins)
    return np.maximum(mu, 0.0)


def _frame_counts(units: UnitParams, stim_rates: np.ndarray, schedule: Schedule, times: np.ndarray,
                  rate_hz: float, rng: np.random.Generator) -> np.ndarray:
    """(n_frames, n_rois) Poisson spike counts per imaging frame."""
    return rng.poisson(frame_means(units, stim_rates, schedule, times, rate_hz)).astype(np.float64)


def ophys_latent(truth: SessionTruth) -> tuple[np.ndarray, np.ndarray]:
    """(expected, drawn) spike counts per frame and ROI of an OPhys session, regenerated from its truth.

    The counts are not saved (they would double a session's size); they are redrawn exactly as
    :func:`_ophys_session` drew them, from the same stream. The ROI parameters drawn after them
    must equal the saved ones, which proves the stream is in step (else ValueError).
    """
    if truth.seed is None or truth.session_index is None or truth.frame_times is None:
        raise ValueError(f"{truth.session_id}: truth has no seed/session index (written before generator version 2)")
    c = truth.config
    rng = rng_for(truth.seed, STREAM_SPIKES, truth.session_index)
    times = frame_times(truth.schedule.duration_s, c.frame_rate_hz, c.frame_jitter_s, rng)
    mu = frame_means(truth.units, presentation_rates(truth.units, truth.model, truth.schedule), truth.schedule, times,
                     c.frame_rate_hz)
    counts = rng.poisson(mu)
    tau_decay = rng.uniform(*c.tau_decay_range_s, size=len(truth.unit_ids))
    if not (np.array_equal(times, truth.frame_times) and np.array_equal(tau_decay, truth.ophys["tau_decay_s"])):
        raise ValueError(f"{truth.session_id}: regenerated frame times / ROI kernels differ from the truth file's "
                         "(made by another generator or numpy?)")
    return mu, counts


def _ephys_session(out_dir: Path, k: int, seed: int, config: SynthConfig, model: CorpusModel,
                   schedule: Schedule) -> tuple[SessionSummary, SessionTruth]:
    session_id = f"synth-ephys-{k:03d}"
    e = k // 2
    n_reg = min(config.regions_per_ephys, len(config.regions))
    regions = [config.regions[(e + j) % len(config.regions)] for j in range(n_reg)]
    layout = probe_layout(k, regions, config.units_per_region, config.unassigned_units, rng_for(seed, STREAM_LAYOUT, k))
    locations = layout.unit_location
    params_of = [loc if loc in regions else UNASSIGNED for loc in locations]
    units = draw_units(model, params_of, config, rng_for(seed, STREAM_UNITS, k), config.ephys_baseline_hz,
                       config.ephys_gain_hz)
    spike_rng = rng_for(seed, STREAM_SPIKES, k)
    trains = _spike_trains(units, presentation_rates(units, model, schedule), schedule, spike_rng)
    unit_ids = 950_000_000 + 10_000 * k + np.arange(len(trains), dtype=np.int64)
    path = out_dir / f"ephys_{session_id}.nwb"
    with atomic_path(path) as part:  # a reader (or an interrupted run) never sees half a file
        write_ephys_nwb(Path(part), session_id=session_id, session_index=k, subject_id=f"synth-mouse-{k:03d}",
                        start_time=EPOCH + dt.timedelta(days=k), layout=layout, unit_ids=unit_ids, spike_trains=trains,
                        schedule=schedule, rng=spike_rng)
    truth = SessionTruth(session_id, "ephys", config, model, unit_ids, locations, units, schedule)
    return SessionSummary(path, session_id, "ephys", regions, len(unit_ids), schedule.duration_s), truth


def _templates(seed: int) -> np.ndarray:
    """Tiny natural-scene stand-ins (118 x 16 x 24 uint8), the same for every session of a corpus."""
    return rng_for(seed, STREAM_CORPUS, 99).integers(0, 256, size=(N_IMAGES, *TEMPLATE_SHAPE), dtype=np.uint8)


def _ophys_session(out_dir: Path, k: int, seed: int, config: SynthConfig, model: CorpusModel, schedule: Schedule,
                   ophys_format: OphysFormat) -> tuple[SessionSummary, SessionTruth]:
    session_id = f"synth-ophys-{k:03d}"
    region = config.regions[(k // 2) % len(config.regions)]
    n = config.rois_per_plane
    units = draw_units(model, [region] * n, config, rng_for(seed, STREAM_UNITS, k), config.ophys_baseline_hz,
                       config.ophys_gain_hz, ophys=True)
    rng = rng_for(seed, STREAM_SPIKES, k)
    times = frame_times(schedule.duration_s, config.frame_rate_hz, config.frame_jitter_s, rng)
    counts = _frame_counts(units, presentation_rates(units, model, schedule), schedule, times, config.frame_rate_hz, rng)
    tau_decay = rng.uniform(*config.tau_decay_range_s, size=n)
    amplitude = config.spike_amplitude * np.exp(rng.normal(0.0, 0.3, size=n))
    noise = config.dff_noise * np.exp(rng.normal(0.0, 0.3, size=n))
    kernels = [calcium_kernel(1.0 / config.frame_rate_hz, config.tau_rise_s, td) for td in tau_decay]
    dff = dff_traces(counts, kernels, amplitude, noise, rng)
    data = OphysData(
        region=region, roi_ids=1_080_000_000 + 1000 * k + np.arange(n, dtype=np.int64),
        cell_specimen_ids=517_000_000 + 1000 * k + np.arange(n, dtype=np.int64), frame_times=times, dff=dff,
        f0=rng.uniform(150.0, 400.0, size=n), roi_centers=rng.integers(10, 502, size=(n, 2)), templates=_templates(seed),
    )
    path = out_dir / f"ophys_{session_id}.nwb"
    start = EPOCH + dt.timedelta(days=k)
    with atomic_path(path) as part:
        if ophys_format == "nwb2":
            write_ophys_nwb2(Path(part), session_id=session_id, subject_id=f"synth-mouse-{k:03d}", start_time=start,
                             data=data, schedule=schedule)
        else:
            write_ophys_nwb1(Path(part), session_id=session_id, experiment_id=700_000_000 + k,
                             container_id=710_000_000 + k // 2, subject_id=f"synth-mouse-{k:03d}", start_time=start,
                             data=data, schedule=schedule)
    truth = SessionTruth(session_id, "ophys", config, model, data.roi_ids, np.asarray([region] * n), units, schedule,
                         frame_times=times, ophys={"tau_decay_s": tau_decay, "amplitude": amplitude, "noise": noise})
    return SessionSummary(path, session_id, "ophys", [region], n, schedule.duration_s), truth


def synthesize_session(out_dir: str | Path, index: int, *, seed: int = 0, ophys_format: OphysFormat = "nwb2",
                       config: SynthConfig | None = None, model: CorpusModel | None = None) -> SessionSummary:
    """Write session ``index`` of the corpus (NWB + truth files) and describe it."""
    config = config or SynthConfig()
    if ophys_format not in ("nwb2", "nwb1"):
        raise ValueError(f"ophys_format must be 'nwb2' or 'nwb1', not {ophys_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model or draw_corpus_model(seed, config)
    schedule = build_schedule(config.duration_s, rng_for(seed, STREAM_SCHEDULE, index), gap_s=config.gap_s,
                              blocks_per_task=config.blocks_per_task, blank_fraction=config.blank_fraction,
                              time_share=config.time_share)
    if index % 2 == 0:
        summary, truth = _ephys_session(out, index, seed, config, ephys_model(model, config), schedule)
    else:
        summary, truth = _ophys_session(out, index, seed, config, model, schedule, ophys_format)
    truth.seed, truth.session_index = int(seed), int(index)
    truth.save(summary.path.with_suffix(""))
    return summary


def synthesize(out_dir: str | Path, sessions: int, seed: int = 0, ophys_format: OphysFormat = "nwb2",
               config: SynthConfig | None = None) -> list[Path]:
    """Write ``sessions`` NWB files (even index EPhys, odd OPhys) with ground truth; returns the NWB paths."""
    config = config or SynthConfig()
    model = draw_corpus_model(seed, config)
    return [synthesize_session(out_dir, k, seed=seed, ophys_format=ophys_format, config=config, model=model).path
            for k in range(sessions)]


# ---- command line ------------------------------------------------------------------------------
def format_table(rows: Sequence[SessionSummary], elapsed_s: float) -> str:
    """The one-screen summary printed after ``python -m ingest synth``."""
    head = ("file", "modality", "regions", "units", "duration", "MB")
    body = [(r.path.name, r.modality, ",".join(r.regions), str(r.n_units), f"{r.duration_s:.0f} s", f"{r.megabytes:.2f}")
            for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "-" * len(line)] + ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    n_e = sum(r.modality == "ephys" for r in rows)
    total = sum(r.megabytes for r in rows)
    out.append(f"{len(rows)} sessions ({n_e} ephys, {len(rows) - n_e} ophys), {total:.1f} MB, {elapsed_s:.1f} s; "
               f"ground truth beside each file (<stem>.truth.json / .truth.npz)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m ingest synth``: write a synthetic corpus and print a summary table."""
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="python -m ingest synth", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                description="Write a seeded synthetic corpus of NWB files in the public Allen layouts "
                                            "(even sessions Neuropixels-like EPhys, odd ones 2P OPhys), with ground truth.")
    p.add_argument("--out", required=True, default=argparse.SUPPRESS, help="output folder")
    p.add_argument("--sessions", type=int, default=6, help="number of sessions (alternating ephys, ophys)")
    p.add_argument("--seed", type=int, default=0, help="corpus seed")
    p.add_argument("--ophys-format", choices=("nwb2", "nwb1"), default="nwb2",
                   help="nwb2: DANDI 000728-like; nwb1: Allen BrainObservatoryCache NWB 1.0.5")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="named configuration; 'science' is the benchmark corpus (docs/results.md)")
    for flag, field_name, kind, what in (("--duration", "duration_s", float, "seconds per session"),
                                         ("--units", "units_per_region", int, "EPhys units per recorded region"),
                                         ("--rois", "rois_per_plane", int, "OPhys ROIs per imaging plane")):
        p.add_argument(flag, type=kind, default=argparse.SUPPRESS, dest=field_name,
                       help=f"{what} (default: the preset's; " + ", ".join(
                           f"{n} {getattr(c, field_name):g}" for n, c in PRESETS.items()) + ")")
    p.add_argument("--regions", default=argparse.SUPPRESS, help="comma-separated region acronyms (default: the preset's, "
                                                   f"{','.join(PRESETS['default'].regions)})")
    p.add_argument("--ephys-code-seed", type=int, default=argparse.SUPPRESS, dest="ephys_code_seed",
                   help="a control corpus: EPhys sessions draw their stimulus code from this seed, unrelated to "
                        "the OPhys sessions' (default: one code for both)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    overrides = {k: getattr(a, k) for k in ("duration_s", "units_per_region", "rois_per_plane", "ephys_code_seed")
                 if hasattr(a, k)}
    if hasattr(a, "regions"):
        overrides["regions"] = tuple(r.strip() for r in a.regions.split(",") if r.strip())
    try:
        if a.sessions < 1:
            raise ValueError("--sessions must be at least 1")
        config = preset_config(a.preset, **overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    model = draw_corpus_model(a.seed, config)
    rows = []
    for k in tqdm(range(a.sessions), desc="synth sessions", unit="session", disable=a.quiet):
        rows.append(synthesize_session(a.out, k, seed=a.seed, ophys_format=a.ophys_format, config=config, model=model))
    print(format_table(rows, time.perf_counter() - t0))
    return 0
