"""The generative model behind the synthetic corpus, its ground truth, and the Bayes-optimal decoder.

Why a model at all: a training pipeline needs data with *learnable* structure and a *known*
optimum, so a run can be judged against the best possible accuracy instead of against chance.

The model, drawn once per corpus seed (shared by every session and both modalities):

- a stimulus code: each (task, class) has a latent vector ``code[task][class]`` (dim
  ``code_dim``). Gratings get a smooth code (low harmonics of the angle plus a random part), so
  neighbouring orientations are more alike than distant ones; natural scenes get random codes.
  Blanks (grating blank sweeps, the natural-scenes blank, spontaneous gaps) show a gray screen
  and have no code: the rate is the unit's baseline.
- region tuning: region ``r`` sees the code through its own projection ``P_r`` (a rotation
  times per-axis scales, so regions emphasise different code directions), has a mean
  preference ``mu_r``, a per-task gain ``task_gain[r, task]`` (regions encode tasks
  differently well) and a response latency.

Per unit (drawn per session): ``w_u = P_r^T (mu_r + spread * z_u)``, a gain and a baseline
(log-normal). During a presentation of class ``c`` of ``task``, shifted by the latency,

    rate_u = baseline_u + gain_u * softplus(strength * task_gain[r, task] * w_u . code[task][c])

and ``baseline_u`` otherwise. The rate is piecewise constant, so EPhys spikes are exact
inhomogeneous Poisson draws (a Poisson count per constant piece, uniform times inside), and the
optimal decoder of a presentation is a Poisson likelihood of the spike counts in its
latency-shifted window (:func:`poisson_class_loglik`, :func:`bayes_accuracy`). OPhys uses the
same rates (its own baseline/gain scale), Poisson spike counts per imaging frame, a GCaMP6f-like
double-exponential kernel, a per-ROI amplitude and Gaussian noise.

Everything is drawn from ``numpy.random.Generator`` streams keyed by (seed, purpose, index),
so the same seed gives byte-identical arrays regardless of how many sessions are made.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ingest.synth.schedule import TASK_CODE, TASK_NAMES, TIME_SHARE, Schedule
from shards.schema import TASKS

#: The five visual areas of the papers.
REGIONS: tuple[str, ...] = ("VISp", "VISl", "VISal", "VISam", "VISpm")
#: Parameters used for units on channels outside the named regions ('grey' or no location).
UNASSIGNED = "unassigned"

#: Stream keys for :func:`rng_for` (never reorder: changing them changes every corpus).
STREAM_CORPUS, STREAM_SCHEDULE, STREAM_UNITS, STREAM_SPIKES, STREAM_LAYOUT = range(5)
#: Version of the generator written into every truth file. Bump it whenever the same config and seed
#: would give other arrays: tools that regenerate latent variables (``ideal.py``) refuse other versions.
#: Files written before the field existed are version 1 (they also lack the seed).
GENERATOR_VERSION = 2


@dataclass
class SynthConfig:
    """Sizes and generative parameters of a synthetic corpus (defaults: small and fast)."""

    duration_s: float = 300.0
    units_per_region: int = 30  # EPhys units per recorded region
    regions_per_ephys: int = 3  # regions each EPhys session records (one probe each)
    unassigned_units: int = 4  # extra EPhys units on 'grey' / empty-location channels
    rois_per_plane: int = 40  # OPhys ROIs
    regions: tuple[str, ...] = REGIONS
    code_dim: int = 8
    tuning_strength: float = 1.0  # scales every drive (signal-to-noise knob)
    tuning_spread: float = 1.0  # per-unit deviation from the region's mean preference
    region_spread: float = 1.0  # scales how much regions differ (log-sd of their axis scales and task gains)
    latency_s: float = 0.05  # mean response latency; regions differ by up to +-15 ms
    ephys_baseline_hz: float = 3.0
    ephys_gain_hz: float = 4.0
    ophys_baseline_hz: float = 0.5
    ophys_gain_hz: float = 2.5
    frame_rate_hz: float = 30.0
    frame_jitter_s: float = 2e-4
    tau_rise_s: float = 0.05
    tau_decay_range_s: tuple[float, float] = (0.4, 0.7)
    spike_amplitude: float = 0.15  # dF/F of one spike at the kernel peak (median over ROIs)
    dff_noise: float = 0.05  # Gaussian noise sd of dF/F (median over ROIs)
    gap_s: float = 5.0  # spontaneous gap between stimulus blocks
    blocks_per_task: int = 2
    blank_fraction: float = 0.05  # grating blank sweeps per condition
    # per-task factor on the drive (tasks differ in difficulty: 6, 8 or 119 classes, 0.25 s or 2 s on)
    task_strength: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASK_NAMES})
    # an extra factor for OPhys ROIs (calcium blurs 0.25-s back-to-back presentations far more than 2-s ones)
    ophys_task_strength: dict[str, float] = field(default_factory=lambda: {t: 1.0 for t in TASK_NAMES})
    # share of the non-gap time each task gets (schedule.TIME_SHARE by default)
    time_share: dict[str, float] = field(default_factory=lambda: dict(TIME_SHARE))
    preset: str = "default"  # name of the preset this config came from (recorded in the truth files)
    # a control corpus: EPhys sessions draw their stimulus code from this seed instead of the corpus seed, so
    # the two modalities share regions, schedules and rates but not what a stimulus means (the papers'
    # mixture benefit should vanish on it); None: one code for both modalities
    ephys_code_seed: int | None = None

    def __post_init__(self) -> None:
        self.regions = tuple(self.regions)
        self.tau_decay_range_s = tuple(self.tau_decay_range_s)  # type: ignore[assignment]
        self.task_strength = {t: float(self.task_strength.get(t, 1.0)) for t in TASK_NAMES}
        self.ophys_task_strength = {t: float(self.ophys_task_strength.get(t, 1.0)) for t in TASK_NAMES}
        self.time_share = {t: float(self.time_share[t]) for t in TASK_NAMES}
        if not self.regions:
            raise ValueError("SynthConfig.regions is empty")
        if self.duration_s <= 0 or self.units_per_region < 1 or self.rois_per_plane < 1:
            raise ValueError("duration_s, units_per_region and rois_per_plane must be positive")
        if (self.unassigned_units < 0 or min(self.task_strength.values()) < 0
                or min(self.ophys_task_strength.values()) < 0 or min(self.time_share.values()) <= 0):
            raise ValueError("unassigned_units and task_strength must be >= 0, time_share > 0")
        if abs(sum(self.time_share.values()) - 1.0) > 1e-9:
            raise ValueError(f"time_share must sum to 1, not {sum(self.time_share.values())}")


def rng_for(seed: int, stream: int, index: int = 0) -> np.random.Generator:
    """An independent generator per (seed, purpose, index): adding sessions never changes earlier ones."""
    return np.random.default_rng([int(seed), int(stream), int(index)])


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


# ---- corpus-level model ---------------------------------------------------------------------
@dataclass
class RegionParams:
    projection: np.ndarray  # (dim, dim) P_r
    mean: np.ndarray  # (dim,) mu_r
    task_gain: np.ndarray  # (n_tasks,) in TASK_NAMES order
    latency_s: float

    def to_json(self) -> dict:
        return {"projection": self.projection.tolist(), "mean": self.mean.tolist(),
                "task_gain": dict(zip(TASK_NAMES, self.task_gain.tolist())), "latency_s": self.latency_s}


@dataclass
class CorpusModel:
    """What every session of a corpus shares: the stimulus code and the regions' tuning."""

    codes: dict[str, np.ndarray]  # task -> (n_stimulus_classes, dim); NS has 118 rows (blank: no code)
    regions: dict[str, RegionParams] = field(default_factory=dict)


def _angle_code(angles_deg: Sequence[float], period: float, dim: int, rng: np.random.Generator) -> np.ndarray:
    a = 2 * np.pi * np.asarray(angles_deg, dtype=np.float64) / period
    harmonics = np.stack([np.cos(a), np.sin(a), np.cos(2 * a), np.sin(2 * a)], axis=1)
    code = harmonics @ rng.normal(size=(4, dim)) + 0.5 * rng.normal(size=(len(a), dim))
    return code / np.linalg.norm(code, axis=1, keepdims=True)


def draw_codes(seed: int, dim: int) -> dict[str, np.ndarray]:
    """The stimulus code of a corpus seed: task -> (n_classes, dim) unit vectors."""
    rng = rng_for(seed, STREAM_CORPUS)
    ns = rng.normal(size=(len(TASKS["natural_scenes"].values), dim))
    return {
        "static_gratings": _angle_code(TASKS["static_gratings"].values, 180.0, dim, rng),
        "drifting_gratings": _angle_code(TASKS["drifting_gratings"].values, 360.0, dim, rng),
        "natural_scenes": ns / np.linalg.norm(ns, axis=1, keepdims=True),
    }


def ephys_model(model: CorpusModel, config: SynthConfig) -> CorpusModel:
    """The corpus model EPhys sessions use: ``model`` itself, or (``config.ephys_code_seed`` set) the same
    regions with the stimulus code of that seed (a control corpus)."""
    if config.ephys_code_seed is None:
        return model
    return CorpusModel(codes=draw_codes(config.ephys_code_seed, config.code_dim), regions=model.regions)


def draw_corpus_model(seed: int, config: SynthConfig) -> CorpusModel:
    """The stimulus code and per-region tuning of a corpus (depends on seed, regions, code_dim, region_spread)."""
    d = config.code_dim
    model = CorpusModel(codes=draw_codes(seed, d))
    names = list(dict.fromkeys(list(REGIONS) + list(config.regions)))  # a region's params never depend on the list
    for name in names + [UNASSIGNED]:
        r = rng_for(seed, STREAM_CORPUS, 1 + zlib.crc32(name.encode()))
        q, _ = np.linalg.qr(r.normal(size=(d, d)))
        scales = np.exp(r.normal(0.0, 0.5 * config.region_spread, size=d))
        gain = np.clip(np.exp(r.normal(0.0, 0.3 * config.region_spread, size=len(TASK_NAMES))), 0.6, 1.6)
        mean = 0.7 * r.normal(size=d)
        latency = config.latency_s + float(r.uniform(-0.015, 0.015))
        if name == UNASSIGNED:
            gain, mean = 0.3 * gain, 0.0 * mean  # off-target channels: weakly tuned
        model.regions[name] = RegionParams(q * scales[None, :], mean, gain, round(latency, 6))
    return model


# ---- per-session units ----------------------------------------------------------------------
@dataclass
class UnitParams:
    """Per-unit parameters of one session (arrays of length n_units)."""

    region: np.ndarray  # str: name of the RegionParams used
    w: np.ndarray  # (n, dim) effective preference P_r^T v_u
    gain: np.ndarray  # Hz
    baseline: np.ndarray  # Hz
    task_gain: np.ndarray  # (n, n_tasks) copied from the region, times tuning_strength
    latency_s: np.ndarray


def draw_units(model: CorpusModel, regions: Sequence[str], config: SynthConfig, rng: np.random.Generator,
               baseline_hz: float, gain_hz: float, ophys: bool = False) -> UnitParams:
    """Units tuned like their region; ``regions[i]`` names the RegionParams of unit i."""
    n, d = len(regions), config.code_dim
    w = np.zeros((n, d))
    task_gain = np.zeros((n, len(TASK_NAMES)))
    latency = np.zeros(n)
    z = rng.normal(size=(n, d))
    # all 1.0 by default: an exact no-op
    per_task = np.asarray([config.task_strength[t] * (config.ophys_task_strength[t] if ophys else 1.0)
                           for t in TASK_NAMES])
    for i, name in enumerate(regions):
        p = model.regions[name]
        w[i] = p.projection.T @ (p.mean + config.tuning_spread * z[i])
        task_gain[i] = config.tuning_strength * p.task_gain * per_task
        latency[i] = p.latency_s
    gain = gain_hz * np.exp(rng.normal(-0.125, 0.5, size=n))
    baseline = baseline_hz * np.exp(rng.normal(-0.125, 0.5, size=n))
    return UnitParams(np.asarray(regions, dtype=str), w, gain, baseline, task_gain, latency)


def class_rates(units: UnitParams, model: CorpusModel, task: str) -> np.ndarray:
    """(n_units, n_classes) firing rate (Hz) during each class of ``task`` (in ``tasks.TASKS`` order).

    The natural-scenes blank class (last) is a gray screen: the baseline.
    """
    code = model.codes[task]
    drive = units.task_gain[:, TASK_CODE[task], None] * (units.w @ code.T)
    rates = units.baseline[:, None] + units.gain[:, None] * softplus(drive)
    if TASKS[task].blank_class:
        rates = np.concatenate([rates, units.baseline[:, None]], axis=1)
    return rates


def presentation_rates(units: UnitParams, model: CorpusModel, schedule: Schedule) -> np.ndarray:
    """(n_units, n_presentations) rate during each presentation; baseline for unlabelled blanks."""
    out = np.repeat(units.baseline[:, None], len(schedule.start), axis=1)
    for name in TASK_NAMES:
        m = schedule.mask(name) & (schedule.label >= 0)
        if m.any():
            out[:, m] = class_rates(units, model, name)[:, schedule.label[m]]
    return out


# ---- rates in time, spikes, calcium -----------------------------------------------------------
def piecewise_rates(schedule: Schedule, stim_rates: np.ndarray, baseline: np.ndarray,
                    latency_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Edges (n_pieces + 1,) and rates (n_units, n_pieces) of the rate functions of units sharing a latency.

    Pieces alternate gray (baseline) and presentation [start + latency, end + latency).
    """
    n = len(schedule.start)
    T = schedule.duration_s
    inner = np.empty(2 * n)
    inner[0::2] = schedule.start + latency_s
    inner[1::2] = schedule.end + latency_s
    edges = np.concatenate([[0.0], np.clip(inner, 0.0, T), [T]])
    edges = np.maximum.accumulate(edges)  # back-to-back presentations: stop_i == start_i+1
    rates = np.repeat(baseline[:, None], 2 * n + 1, axis=1)
    rates[:, 1::2] = stim_rates
    return edges, rates


def poisson_spikes(edges: np.ndarray, rates: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Exact inhomogeneous Poisson spike trains for piecewise-constant rates (sorted float64 per unit)."""
    dur = np.diff(edges)
    counts = rng.poisson(rates * dur[None, :])
    trains = []
    for c in counts:
        t0 = np.repeat(edges[:-1], c)
        trains.append(np.sort(t0 + rng.random(len(t0)) * np.repeat(dur, c)))
    return trains


def expected_counts(edges: np.ndarray, rates: np.ndarray, bin_edges: np.ndarray) -> np.ndarray:
    """(n_bins, n_units) integral of each unit's rate over [bin_edges[k], bin_edges[k+1])."""
    cum = np.concatenate([np.zeros((rates.shape[0], 1)), np.cumsum(rates * np.diff(edges)[None, :], axis=1)], axis=1)
    at = np.stack([np.interp(bin_edges, edges, c) for c in cum], axis=1)
    return np.diff(at, axis=0)


def frame_times(duration_s: float, rate_hz: float, jitter_s: float, rng: np.random.Generator) -> np.ndarray:
    """Imaging frame times: a regular clock with tiny jitter, strictly increasing."""
    n = int(duration_s * rate_hz)
    t = np.arange(n, dtype=np.float64) / rate_hz + rng.normal(0.0, jitter_s, size=n)
    t[0] = max(t[0], 0.0)
    return np.maximum.accumulate(t)


def calcium_kernel(dt: float, tau_rise_s: float, tau_decay_s: float) -> np.ndarray:
    """Double exponential exp(-t/decay) - exp(-t/rise), peak normalised to 1, 6 decay constants long."""
    t = np.arange(int(np.ceil(6 * tau_decay_s / dt)) + 1) * dt
    k = np.exp(-t / tau_decay_s) - np.exp(-t / tau_rise_s)
    return k / k.max()


def dff_traces(counts: np.ndarray, kernels: Sequence[np.ndarray], amplitude: np.ndarray, noise: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """(n_frames, n_rois) float32 dF/F: spike counts convolved with each ROI's kernel, scaled, plus noise."""
    n_frames, n_rois = counts.shape
    out = np.empty((n_frames, n_rois))
    for j in range(n_rois):
        out[:, j] = amplitude[j] * np.convolve(counts[:, j], kernels[j])[:n_frames]
    out += noise[None, :] * rng.normal(size=out.shape)
    return out.astype(np.float32)


# ---- ground truth on disk (JSON + NPZ, no pickle) ---------------------------------------------
@dataclass
class SessionTruth:
    """Everything needed to recompute the rates of a session and decode it optimally."""

    session_id: str
    modality: str
    config: SynthConfig
    model: CorpusModel
    unit_ids: np.ndarray  # int64, the ids the NWB file uses (units.id / ROI ids)
    unit_location: np.ndarray  # str, the location string written in the file
    units: UnitParams
    schedule: Schedule
    frame_times: np.ndarray | None = None  # OPhys
    ophys: dict[str, np.ndarray] = field(default_factory=dict)  # tau_decay_s, amplitude, noise per ROI
    seed: int | None = None  # corpus seed and session index: enough to regenerate latent draws (OPhys spikes)
    session_index: int | None = None
    generator_version: int = GENERATOR_VERSION

    def save(self, stem: Path) -> tuple[Path, Path]:
        """Write ``<stem>.truth.json`` and ``<stem>.truth.npz``."""
        json_path, npz_path = Path(f"{stem}.truth.json"), Path(f"{stem}.truth.npz")
        cfg = asdict(self.config)
        meta = {
            "session_id": self.session_id, "modality": self.modality, "config": cfg, "task_names": list(TASK_NAMES),
            "rate": "baseline + gain * softplus(task_gain[task] * w . code[task][class]) during "
                    "[start + latency, end + latency); baseline otherwise",
            "region_params": {k: v.to_json() for k, v in self.model.regions.items()},
            "units": [{"id": int(i), "location": str(loc), "params": str(r)}
                      for i, loc, r in zip(self.unit_ids, self.unit_location, self.units.region)],
            "duration_s": self.schedule.duration_s,
            "generator_version": self.generator_version, "seed": self.seed, "session_index": self.session_index,
            "preset": self.config.preset,
        }
        if self.modality == "ophys":
            meta["kernel"] = {"form": "exp(-t/tau_decay) - exp(-t/tau_rise), peak 1, times amplitude",
                              "tau_rise_s": self.config.tau_rise_s,
                              "tau_decay_s": self.ophys["tau_decay_s"].tolist(),
                              "amplitude": self.ophys["amplitude"].tolist(), "frame_rate_hz": self.config.frame_rate_hz}
            meta["noise"] = {"form": "additive Gaussian on dF/F", "sd": self.ophys["noise"].tolist()}
        arrays: dict[str, np.ndarray] = {f"code_{k}": v for k, v in self.model.codes.items()}
        arrays.update({f"unit_{k}": np.asarray(v) for k, v in vars(self.units).items()})
        arrays["unit_id"] = np.asarray(self.unit_ids, dtype=np.int64)
        arrays["unit_location"] = np.asarray(self.unit_location, dtype=str)
        arrays.update({f"schedule_{k}": v for k, v in self.schedule.arrays().items()})
        if self.frame_times is not None:
            arrays["frame_times"] = self.frame_times
        arrays.update({f"ophys_{k}": np.asarray(v) for k, v in self.ophys.items()})
        json_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
        with open(npz_path, "wb") as fh:
            np.savez(fh, **arrays)
        return json_path, npz_path

    @classmethod
    def load(cls, stem: str | Path) -> SessionTruth:
        """Read the pair written by :meth:`save` (``stem`` may be the .nwb path or the bare stem)."""
        stem = str(stem).removesuffix(".nwb").removesuffix(".truth.json").removesuffix(".truth.npz")
        meta = json.loads(Path(f"{stem}.truth.json").read_text())
        with np.load(f"{stem}.truth.npz", allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        config = SynthConfig(**meta["config"])
        regions = {k: RegionParams(np.asarray(v["projection"]), np.asarray(v["mean"]),
                                   np.asarray([v["task_gain"][t] for t in TASK_NAMES]), float(v["latency_s"]))
                   for k, v in meta["region_params"].items()}
        model = CorpusModel({k[5:]: v for k, v in a.items() if k.startswith("code_")}, regions)
        units = UnitParams(**{k[5:]: a[k] for k in ("unit_region", "unit_w", "unit_gain", "unit_baseline",
                                                     "unit_task_gain", "unit_latency_s")})
        sched = {k[9:]: v for k, v in a.items() if k.startswith("schedule_")}
        schedule = Schedule(duration_s=float(meta["duration_s"]), **sched)
        ophys = {k[6:]: v for k, v in a.items() if k.startswith("ophys_")}
        return cls(meta["session_id"], meta["modality"], config, model, a["unit_id"], a["unit_location"], units,
                   schedule, a.get("frame_times"), ophys, meta.get("seed"), meta.get("session_index"),
                   int(meta.get("generator_version", 1)))


# ---- the optimal decoder ------------------------------------------------------------------------
def poisson_class_loglik(counts: np.ndarray, rates: np.ndarray, durations: np.ndarray) -> np.ndarray:
    """(n_presentations, n_classes) log-likelihood of each class given spike counts.

    counts: (n_presentations, n_units) spikes in each presentation's response window;
    rates: (n_units, n_classes) Hz; durations: (n_presentations,) window lengths in seconds.
    Terms that do not depend on the class (log n!) are dropped.
    """
    counts = np.asarray(counts, dtype=np.float64)
    lam = np.asarray(durations, dtype=np.float64)[:, None, None] * rates[None, :, :]  # (p, u, c)
    return np.einsum("pu,puc->pc", counts, np.log(lam)) - lam.sum(axis=1)


def window_counts(spike_trains: Sequence[np.ndarray], start: np.ndarray, stop: np.ndarray,
                  latency_s: np.ndarray) -> np.ndarray:
    """(n_presentations, n_units) spikes of each unit in [start + latency_u, stop + latency_u)."""
    out = np.zeros((len(start), len(spike_trains)), dtype=np.int64)
    for u, t in enumerate(spike_trains):
        out[:, u] = np.searchsorted(t, stop + latency_s[u]) - np.searchsorted(t, start + latency_s[u])
    return out


def bayes_accuracy(truth: SessionTruth, spike_trains: Sequence[np.ndarray], task: str,
                   units: np.ndarray | None = None) -> float:
    """Accuracy of the optimal (true-parameter, flat-prior) Poisson decoder on the labelled presentations of ``task``.

    ``spike_trains[i]`` belongs to unit i of ``truth`` (same order as ``truth.unit_ids``);
    ``units`` (indices) restricts the decoder to a subset, e.g. one region.
    """
    idx = np.arange(len(spike_trains)) if units is None else np.asarray(units)
    sub = UnitParams(**{k: np.asarray(v)[idx] for k, v in vars(truth.units).items()})
    s = truth.schedule
    m = s.mask(task) & (s.label >= 0)
    counts = window_counts([spike_trains[i] for i in idx], s.start[m], s.end[m], sub.latency_s)
    ll = poisson_class_loglik(counts, class_rates(sub, truth.model, task), s.end[m] - s.start[m])
    return float(np.mean(np.argmax(ll, axis=1) == s.label[m]))
