"""What the benches share: one synthetic store, synthesized and ingested the way a user would.

    from bench.common import build_store
    store = build_store(work, sessions=6, duration=600.0)           # bench/stream.py
    store = build_store(work, 4, 600.0, units_per_region=60)        # bench/train.py

The store is made by ``ingest.synth.synthesize`` then ``ingest.run.run_ingest`` on a local Ray
cluster of ``workers`` CPUs, which stays up for the caller (Ray Train benches use it; the stream
bench shuts it down). The NWB files are deleted once ingested. A store already built in ``work``
with the same arguments (its manifest written: the tables are complete) is reused as it is.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ingest.run import ensure_ray, run_ingest
from ingest.synth import SynthConfig, synthesize
from shards import manifest
from shards.store import Store


def build_store(work: Path, sessions: int, duration: float, seed: int = 0, *, units_per_region: int = 100,
                rois_per_plane: int = 150, workers: int = 2) -> str:
    """The URI of a store of ``sessions`` synthetic sessions of ``duration`` s (corpus ``seed``) under ``work``."""
    ensure_ray(workers)
    name = f"{sessions}x{duration:g}s-seed{seed}-u{units_per_region}-r{rois_per_plane}"
    out = Path(work) / f"store-{name}"
    if Store(str(out)).exists(manifest.MANIFEST):
        return str(out)
    src = Path(work) / f"nwb-{name}"
    synthesize(src, sessions=sessions, seed=seed,
               config=SynthConfig(duration_s=duration, units_per_region=units_per_region, rois_per_plane=rois_per_plane))
    s = run_ingest(str(src), str(out), workers=workers, progress=False)
    assert not s.failed, s.failed
    shutil.rmtree(src)
    return str(out)
