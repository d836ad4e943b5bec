"""Mixture selectors (``modality[/region[/session]]=weight``) and the exact interleave.

Selectors are made disjoint by specificity: a chunk belongs to the most specific
selector that matches it, so ``ophys/VISp=1,ophys=1`` means "VISp OPhys" and
"the other OPhys" at equal shares, and no window is counted twice.

The interleave is exact, not "in expectation": position i of the epoch's window
sequence goes to the selector with the largest deficit ``w_s * (i + 1) - c_s(i)``
(ties broken by a seeded order). Every prefix then holds each selector's share to
within one window, and any run of consecutive windows to within two (the
difference of two prefixes); for two selectors the bound on runs is one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shards.schema import MODALITIES


@dataclass(frozen=True)
class Selector:
    modality: str
    region: str | None = None
    session: str | None = None
    weight: float = 1.0

    @property
    def name(self) -> str:
        return "/".join(p for p in (self.modality, self.region, self.session) if p)

    @property
    def specificity(self) -> int:
        return 1 + (self.region is not None) + (self.session is not None)

    def matches(self, modality: np.ndarray, region: np.ndarray, session: np.ndarray) -> np.ndarray:
        m = modality == self.modality
        if self.region is not None and self.region != "*":
            m &= region == self.region
        if self.session is not None:
            m &= session == self.session
        return m


def parse_mix(text: str) -> list[Selector]:
    """``"ephys=0.3,ophys/VISp=0.7"`` -> selectors with normalised weights; clear errors otherwise."""
    if not text or not text.strip():
        raise ValueError("empty --mix: give selectors like ephys=0.3,ophys=0.7")
    out: list[Selector] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().strip("/")
        try:
            weight = float(value) if eq else 1.0
        except ValueError:
            raise ValueError(f"--mix {part!r}: weight {value!r} is not a number") from None
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"--mix {part!r}: weight must be a finite number >= 0")
        bits = key.split("/")
        if bits[0] not in MODALITIES or len(bits) > 3 or any(not b for b in bits):
            raise ValueError(f"unknown selector {key!r}: use modality[/region[/session]] with modality in {MODALITIES}")
        sel = Selector(bits[0], bits[1] if len(bits) > 1 else None, bits[2] if len(bits) > 2 else None, weight)
        if any(s.name == sel.name for s in out):
            raise ValueError(f"--mix names selector {sel.name!r} twice")
        out.append(sel)
    total = sum(s.weight for s in out)
    if total <= 0:
        raise ValueError(f"--mix {text!r}: weights sum to zero")
    return [Selector(s.modality, s.region, s.session, s.weight / total) for s in out if s.weight > 0]


def assign(selectors: list[Selector], modality: np.ndarray, region: np.ndarray, session: np.ndarray) -> np.ndarray:
    """Selector index per row (-1: no selector); the most specific match wins. Raises for a
    selector that matches nothing, naming it."""
    owner = np.full(len(modality), -1, dtype=np.int64)
    best = np.zeros(len(modality), dtype=np.int64)
    for i, s in enumerate(selectors):
        m = s.matches(modality, region, session)
        if not m.any():
            raise ValueError(f"--mix selector {s.name!r} matches no shard in the store")
        take = m & (s.specificity > best)
        owner[take] = i
        best[take] = s.specificity
    for i, s in enumerate(selectors):
        if not (owner == i).any():
            raise ValueError(f"--mix selector {s.name!r} only matches data claimed by more specific selectors")
    return owner


def interleave(weights: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Selector index for each of n positions: largest deficit first (seeded tie order)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    k = len(w)
    tie = np.random.default_rng(seed).permutation(k) * 1e-9  # deterministic, seed-dependent tie-break
    counts = np.zeros(k)
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        s = int(np.argmax(w * (i + 1) - counts + tie))
        out[i] = s
        counts[s] += 1
    return out
