"""A training run's accuracy next to chance and the ideal observer, on a synthetic corpus.

    python bench/vs_ideal.py --run demo/run --store demo/store --truth demo/nwb [--split valid]

The run's figures are its best validation metrics (``RUN/metrics.json``: per record, one prediction per
presentation, mean over records); the ideal observer (``ingest.synth.ideal``) decodes exactly the
presentations of the same split from the truth files (EPhys exact; OPhys: its lower bound, a decoder that
knows the truth, and the upper bound in brackets). ``make demo`` ends with this table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest.synth.ideal import ideal_observer  # noqa: E402
from shards.schema import TASKS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a trainer.train run folder")
    p.add_argument("--store", required=True)
    p.add_argument("--truth", required=True, help="the folder of the NWB files and their truth files")
    p.add_argument("--split", default="valid", choices=("valid", "test"))
    a = p.parse_args(argv)
    metrics = json.loads((Path(a.run) / "metrics.json").read_text())
    run = metrics["best"] if a.split == "valid" else metrics.get("test") or {}
    records = sorted(run.get("record", {}))
    sessions = sorted({r.split("/")[0] for r in records})
    ideal: dict = {}
    for r in ideal_observer(a.store, a.truth, split=a.split, sessions=sessions or None):
        key = f"{r.session}/{r.region}"
        if records and key not in records:
            continue
        ideal.setdefault((r.modality, r.task), []).append((r.accuracy, r.upper))
    print(f"{a.split} split: model {Path(a.run).name} (best validation), mean over records")
    print(f"{'modality':8} {'task':18} {'chance':>7} {'model':>7} {'ideal':>15} {'model/ideal':>11}")
    for mod, entry in run.get("modality", {}).items():
        for task, v in entry["tasks"].items():
            if "acc" not in v:
                continue
            rows = ideal.get((mod, task), [])
            lo = float(np.mean([x for x, _ in rows])) if rows else math.nan
            ups = [u for _, u in rows if u is not None]
            hi = f" [{np.mean(ups):.3f}]" if ups else ""
            print(f"{mod:8} {task:18} {1 / TASKS[task].n_classes:7.3f} {v['acc']:7.3f} {lo:>7.3f}{hi:8} "
                  f"{v['acc'] / lo if lo else math.nan:11.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
