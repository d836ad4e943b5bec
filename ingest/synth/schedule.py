"""The stimulus schedule of one synthetic session: which presentation is on screen when.

Why it looks like this: the readers must meet the same stimulus *design* as in the Allen Brain
Observatory (static gratings and natural scenes flashed for 0.25 s back to back, drifting
gratings shown 2 s with 1 s of gray between, blocks separated by spontaneous gray-screen
gaps), so the synthetic files exercise the same code paths as the real ones. One deliberate
simplification: every session shows all three tasks (Allen splits them over session types
A/B/C), so a small corpus already covers every task in both modalities.

Conditions are drawn as concatenated random permutations of the full condition list (the
Allen design repeats every condition equally often in shuffled order), so classes are nearly
balanced even in a short session.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from shards.schema import DRIFTING_GRATINGS, NATURAL_SCENES, STATIC_GRATINGS, TASKS, labels_for

#: Task names in the order used by integer task codes in the arrays below.
TASK_NAMES: tuple[str, ...] = (STATIC_GRATINGS.name, DRIFTING_GRATINGS.name, NATURAL_SCENES.name)
TASK_CODE = {name: i for i, name in enumerate(TASK_NAMES)}
SPONTANEOUS = "spontaneous"

#: Allen stimulus parameter grids.
SG_SPATIAL_FREQUENCIES = (0.02, 0.04, 0.08, 0.16, 0.32)
SG_PHASES = (0.0, 0.25, 0.5, 0.75)
DG_TEMPORAL_FREQUENCIES = (1.0, 2.0, 4.0, 8.0, 15.0)
DG_SPATIAL_FREQUENCY = 0.04
N_IMAGES = len(NATURAL_SCENES.values)  # 118

#: Presentation timing (seconds): on-time and gray after each presentation.
ON_S = {STATIC_GRATINGS.name: 0.25, NATURAL_SCENES.name: 0.25, DRIFTING_GRATINGS.name: 2.0}
OFF_S = {STATIC_GRATINGS.name: 0.0, NATURAL_SCENES.name: 0.0, DRIFTING_GRATINGS.name: 1.0}
#: Share of the non-gap time each task gets, and the order of blocks (Allen session A starts with DG).
TIME_SHARE = {DRIFTING_GRATINGS.name: 0.4, STATIC_GRATINGS.name: 0.3, NATURAL_SCENES.name: 0.3}
BLOCK_ORDER = (DRIFTING_GRATINGS.name, STATIC_GRATINGS.name, NATURAL_SCENES.name)
#: Allen-like stimulus_index per stimulus (the value is arbitrary but fixed).
STIMULUS_INDEX = {SPONTANEOUS: 0, DRIFTING_GRATINGS.name: 2, STATIC_GRATINGS.name: 3, NATURAL_SCENES.name: 4}


@dataclass
class Schedule:
    """All presentations of a session, sorted by start; parameter arrays are NaN where not applicable.

    ``label`` is the class index from :func:`shards.schema.labels_for` (-1 for grating blank sweeps,
    118 for the natural-scenes blank), i.e. exactly what a reader should recover from the file.
    """

    duration_s: float
    start: np.ndarray  # float64 (n,)
    end: np.ndarray  # float64 (n,) = stop_time in the NWB tables
    task: np.ndarray  # int8 (n,) index into TASK_NAMES
    label: np.ndarray  # int64 (n,)
    block: np.ndarray  # int64 (n,) stimulus_block (counts spontaneous blocks too)
    orientation: np.ndarray  # float64, NaN = blank or not a grating
    spatial_frequency: np.ndarray
    phase: np.ndarray
    temporal_frequency: np.ndarray
    frame: np.ndarray  # float64, image index 0..117, -1 = blank, NaN = not natural scenes
    epoch_name: np.ndarray  # str (m,) task name or 'spontaneous'
    epoch_start: np.ndarray  # float64 (m,)
    epoch_stop: np.ndarray  # float64 (m,)
    epoch_block: np.ndarray  # int64 (m,)

    def mask(self, task: str) -> np.ndarray:
        return self.task == TASK_CODE[task]

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array, for ``np.savez`` (no object arrays, so it loads with allow_pickle=False)."""
        out = {k: np.asarray(v) for k, v in vars(self).items() if k != "duration_s"}
        out["epoch_name"] = np.asarray(self.epoch_name, dtype=str)
        return out


def _conditions(task: str, blank_fraction: float) -> list[tuple[float, ...]]:
    """The condition list of a task: one tuple of stimulus parameters per condition."""
    nan = float("nan")
    if task == STATIC_GRATINGS.name:
        conds = [(o, sf, ph) for o, sf, ph in itertools.product(STATIC_GRATINGS.values, SG_SPATIAL_FREQUENCIES, SG_PHASES)]
        return conds + [(nan, nan, nan)] * max(1, round(blank_fraction * len(conds)))
    if task == DRIFTING_GRATINGS.name:
        conds = [(o, tf) for o, tf in itertools.product(DRIFTING_GRATINGS.values, DG_TEMPORAL_FREQUENCIES)]
        return conds + [(nan, nan)] * max(1, round(blank_fraction * len(conds)))
    return [(float(i),) for i in range(N_IMAGES)] + [(-1.0,)]  # Allen: the blank is one "image" among 119


def _draw(task: str, n: int, blank_fraction: float, rng: np.random.Generator) -> np.ndarray:
    conds = np.asarray(_conditions(task, blank_fraction), dtype=np.float64)
    reps = -(-n // len(conds))
    order = np.concatenate([rng.permutation(len(conds)) for _ in range(reps)])[:n]
    return conds[order]


def build_schedule(duration_s: float, rng: np.random.Generator, *, gap_s: float = 5.0, blocks_per_task: int = 2,
                   blank_fraction: float = 0.05, time_share: dict[str, float] | None = None) -> Schedule:
    """Blocks DG, SG, NS repeated ``blocks_per_task`` times, a spontaneous gap before each and at the end.

    ``time_share`` (default :data:`TIME_SHARE`): each task's share of the non-gap time (sums to 1).
    """
    share = TIME_SHARE if time_share is None else time_share
    n_blocks = len(BLOCK_ORDER) * blocks_per_task
    n_gaps = n_blocks + 1
    gap = min(gap_s, 0.3 * duration_s / n_gaps)  # gaps never eat more than 30 % of a short session
    avail = duration_s - n_gaps * gap
    per_block = {t: share[t] * avail / blocks_per_task for t in BLOCK_ORDER}
    n_per_block = {t: max(1, int(per_block[t] // (ON_S[t] + OFF_S[t]))) for t in BLOCK_ORDER}
    params = {t: _draw(t, n_per_block[t] * blocks_per_task, blank_fraction, rng) for t in BLOCK_ORDER}

    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("start", "stop", "task", "block", "ori", "sf", "ph", "tf", "frame")}
    ep_name, ep_start, ep_stop, ep_block = [], [], [], []
    t, block = 0.0, 0
    used = {name: 0 for name in BLOCK_ORDER}
    for _ in range(blocks_per_task):
        for name in BLOCK_ORDER:
            ep_name.append(SPONTANEOUS), ep_start.append(t), ep_stop.append(t + gap), ep_block.append(block)
            t, block = t + gap, block + 1
            n = n_per_block[name]
            p = params[name][used[name]:used[name] + n]
            used[name] += n
            cycle = ON_S[name] + OFF_S[name]
            start = t + cycle * np.arange(n, dtype=np.float64)
            stop = start + ON_S[name]
            nan = np.full(n, np.nan)
            ori, sf, ph, tf, frame = nan, nan, nan, nan, nan
            if name == STATIC_GRATINGS.name:
                ori, sf, ph = p[:, 0], p[:, 1], p[:, 2]
            elif name == DRIFTING_GRATINGS.name:
                ori, tf = p[:, 0], p[:, 1]
                sf = np.where(np.isnan(ori), np.nan, DG_SPATIAL_FREQUENCY)
            else:
                frame = p[:, 0]
            for key, val in (("start", start), ("stop", stop), ("ori", ori), ("sf", sf), ("ph", ph), ("tf", tf),
                             ("frame", frame)):
                cols[key].append(val)
            cols["task"].append(np.full(n, TASK_CODE[name], dtype=np.int8))
            cols["block"].append(np.full(n, block, dtype=np.int64))
            end = float(stop[-1] + OFF_S[name])
            ep_name.append(name), ep_start.append(t), ep_stop.append(end), ep_block.append(block)
            t, block = end, block + 1
    tail = max(gap, duration_s - t)
    ep_name.append(SPONTANEOUS), ep_start.append(t), ep_stop.append(t + tail), ep_block.append(block)

    c = {k: np.concatenate(v) for k, v in cols.items()}
    label = np.full(len(c["start"]), -1, dtype=np.int64)
    for name in TASK_NAMES:
        m = c["task"] == TASK_CODE[name]
        values = c["frame"][m] if name == NATURAL_SCENES.name else c["ori"][m]
        label[m] = labels_for(TASKS[name], values)
    return Schedule(
        duration_s=float(max(duration_s, t + tail)),
        start=c["start"], end=c["stop"], task=c["task"], label=label, block=c["block"],
        orientation=c["ori"], spatial_frequency=c["sf"], phase=c["ph"], temporal_frequency=c["tf"], frame=c["frame"],
        epoch_name=np.asarray(ep_name, dtype=str), epoch_start=np.asarray(ep_start), epoch_stop=np.asarray(ep_stop),
        epoch_block=np.asarray(ep_block, dtype=np.int64),
    )
