"""What a shard's samples mean, defined once and imported by every layer: the modalities (and their
batch codes) and the decoding tasks of the papers with their class lists.

Every reader maps a stimulus presentation to ``(task, label)`` through these
functions, so a class index means the same thing in every file, modality and
shard.

Drifting gratings: the papers' text says "6 classes", but every Allen file
(2P and Neuropixels) presents 8 *directions* (0..315 deg, step 45) and POYO+
itself describes "eight different orientations". Folding 8 directions into 6
classes is not possible without inventing a mapping, and folding modulo 180
gives 4 orientations, so we keep the 8 directions the stimulus really has.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The recording modalities, in the order of their codes in ``batch["modality"]`` (docs/batch.md):
#: 0 = EPhys spike tokens, 1 = OPhys calcium tokens.
MODALITIES: tuple[str, ...] = ("ephys", "ophys")
MODALITY_INDEX: dict[str, int] = {m: i for i, m in enumerate(MODALITIES)}


@dataclass(frozen=True)
class Task:
    """A classification task: its name, the stimulus values of each class, and what a blank is."""

    name: str
    values: tuple[float, ...]
    blank_class: bool  # True: blank presentations are their own (last) class

    @property
    def n_classes(self) -> int:
        return len(self.values) + (1 if self.blank_class else 0)


STATIC_GRATINGS = Task("static_gratings", tuple(float(v) for v in range(0, 180, 30)), blank_class=False)
DRIFTING_GRATINGS = Task("drifting_gratings", tuple(float(v) for v in range(0, 360, 45)), blank_class=False)
NATURAL_SCENES = Task("natural_scenes", tuple(float(v) for v in range(118)), blank_class=True)

TASKS: dict[str, Task] = {t.name: t for t in (STATIC_GRATINGS, DRIFTING_GRATINGS, NATURAL_SCENES)}
#: Intervals from files without a known stimulus (trials, epochs) keep this task name and label -1.
GENERIC_TASK = "trials"
UNLABELLED = -1


def labels_for(task: Task, values: np.ndarray) -> np.ndarray:
    """Class index per presentation; UNLABELLED (-1) for blanks of tasks without a blank class
    and for values that are not one of the task's classes (so they never train a wrong label).

    Blank is NaN for gratings; for natural scenes it is -1 (NWB1/Neuropixels) or any index past
    the last image (the NWB2 conversions store -1 cast to uint32).
    """
    v = np.asarray(values, dtype=np.float64)
    table = np.asarray(task.values)
    out = np.full(v.shape, UNLABELLED, dtype=np.int64)
    finite = np.isfinite(v)
    idx = np.searchsorted(table, np.where(finite, v, 0.0))
    idx = np.clip(idx, 0, len(table) - 1)
    hit = finite & np.isclose(table[idx], v, atol=1e-3)
    out[hit] = idx[hit]
    if task.blank_class:
        blank = ~finite | (v < 0) | (v >= len(table))
        out[blank] = len(table)
    return out
