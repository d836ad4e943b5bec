"""A sweep's points: the crossed axes of a spec, each a pretraining mixture and its session set.

A point's mixture: ``ratio`` r is the fraction of EPhys windows, ``ephys=r,ophys=1-r`` with a zero side
dropped; a region subset names each of its regions with an equal share of its modality's weight
(``ophys/VISp=0.5`` for OPhys VISp only), so a multi-region EPhys session contributes only its windows
of the named regions. A set size keeps that many pretraining sessions per region
(``trainer.tune.heldout.pretraining_sessions``), through the run's session include list; the held-out
sessions are always excluded. Axes that do not apply collapse (a ratio of 0 has no EPhys, so its EPhys
region subsets are one point), so no trial is run twice.

A point found by ``--search bayes`` has per-region ``weights`` instead of a ratio
(``{"ephys/VISp": 0.2, "ophys/VISl": 0.7, ...}``); its ratio is the EPhys share of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field

import pandas as pd

from trainer.tune.heldout import pretraining_sessions, regions_of
from trainer.tune.spec import ExperimentSpec, subset_regions
from trainer.typecheck import ConfigError

ALL = "all"


@dataclass(frozen=True)
class Point:
    ratio: float
    seed: int
    set_size: int | None = None
    variant: str = "main"
    ophys_regions: str = ALL
    ephys_regions: str = ALL
    weights: dict[str, float] = field(default_factory=dict)  # bayes: selector -> weight

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Point:
        return cls(ratio=float(d["ratio"]), seed=int(d["seed"]), set_size=d.get("set_size"),
                   variant=d.get("variant", "main"), ophys_regions=d.get("ophys_regions", ALL),
                   ephys_regions=d.get("ephys_regions", ALL), weights=dict(d.get("weights") or {}))

    @property
    def key(self) -> str:
        """A folder name that says the point (the same in every process and on every rerun)."""
        text = (f"r{self.ratio:g}_s{self.seed}_n{self.set_size if self.set_size is not None else 'all'}_"
                f"{self.variant}_o-{self.ophys_regions}_e-{self.ephys_regions}")
        if self.weights:
            digest = hashlib.sha1(json.dumps(self.weights, sort_keys=True).encode()).hexdigest()[:8]
            text += f"_w{digest}"
        return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)

    def side(self, modality: str) -> float:
        """The weight of a modality in the mixture (0: the point never pretrains on it)."""
        if self.weights:
            return sum(w for k, w in self.weights.items() if k.split("/")[0] == modality)
        return self.ratio if modality == "ephys" else 1.0 - self.ratio

    def mix(self) -> str:
        """The pretraining --mix of this point."""
        if self.weights:
            return ",".join(f"{k}={_num(w)}" for k, w in sorted(self.weights.items()) if w > 0)
        parts = []
        for mod, subset in (("ephys", self.ephys_regions), ("ophys", self.ophys_regions)):
            w = self.side(mod)
            if w <= 0:
                continue
            regions = subset_regions(subset)
            if regions is None:
                parts.append(f"{mod}={_num(w)}")
            else:
                parts += [f"{mod}/{r}={_num(w / len(regions))}" for r in regions]
        return ",".join(parts)

    def regions(self, modality: str) -> list[str] | None:
        """The pretraining regions of a modality (None: all)."""
        if self.weights:
            return sorted({k.split("/")[1] for k, w in self.weights.items() if k.startswith(modality + "/") and w > 0})
        return subset_regions(self.ephys_regions if modality == "ephys" else self.ophys_regions)


def _num(x: float) -> str:
    return f"{round(x, 6):g}"


def grid_points(spec: ExperimentSpec) -> list[Point]:
    """Every point of the crossed axes, axes that do not apply collapsed, in a fixed order."""
    seen, out = set(), []
    for ratio, variant, set_size, o, e, seed in itertools.product(spec.ratios, spec.variants, spec.set_sizes,
                                                                   spec.ophys_regions, spec.ephys_regions,
                                                                   spec.seeds):
        p = Point(ratio=float(ratio), seed=seed, set_size=set_size, variant=variant,
                  ophys_regions=o if ratio < 1 else ALL, ephys_regions=e if ratio > 0 else ALL)
        if p.key not in seen:
            seen.add(p.key)
            out.append(p)
    return out


def check_regions(spec: ExperimentSpec, table: pd.DataFrame, store: str, where: dict[str, str]) -> None:
    """Every region a subset names exists in the store for its modality; ConfigError naming the field."""
    for mod, name in (("ophys", "ophys_regions"), ("ephys", "ephys_regions")):
        have = regions_of(table, mod)
        for subset in getattr(spec, name):
            for region in subset_regions(subset) or []:
                if region not in have:
                    raise ConfigError(f"{where.get(name, 'spec')}: {name}: unknown region {region!r}: {store} "
                                      f"has {mod} in {', '.join(have) or 'no region'}")


def point_sessions(point: Point, table: pd.DataFrame, heldout: dict, heldout_seed: int) -> list[str]:
    """The sessions a point pretrains on (both modalities, held-out ones never); ValueError when a
    modality the mixture asks for has none."""
    out: list[str] = []
    for mod in ("ephys", "ophys"):
        if point.side(mod) <= 0:
            continue
        ids = pretraining_sessions(table, heldout, mod, point.regions(mod), point.set_size, heldout_seed)
        if not ids:
            raise ValueError(f"point {point.key}: no {mod} session is left for pretraining once the held-out "
                             f"sessions are excluded")
        out += ids
    return sorted(set(out))
