"""TensorBoard hparams, one run per trial under SWEEP/tb/<point>/: the point's axes next to its test
accuracy per evaluated modality and task, so ``tensorboard --logdir SWEEP/tb`` (HPARAMS tab) lays the
trials side by side. Written by the driver from the results rows (the same rows results.parquet holds), less
the records of labels that name no brain area (``trainer.tune.heldout.area_rows``), as in results.md."""

from __future__ import annotations

import os
import shutil

import pandas as pd

from trainer.tune.heldout import area_rows


def write_hparams(df: pd.DataFrame, log_dir: str) -> int:
    """One hparams run per trial (point); returns how many it wrote. Rewrites log_dir."""
    from torch.utils.tensorboard import SummaryWriter

    if os.path.isdir(log_dir):
        shutil.rmtree(log_dir)
    n = 0
    for point, g in area_rows(df).groupby("point", sort=True):
        first = g.iloc[0]
        hparams = {"ratio": float(first.ratio), "seed": int(first.seed),
                   "set_size": "all" if pd.isna(first.set_size) else int(first.set_size),
                   "variant": first.variant, "ophys_regions": first.ophys_regions,
                   "ephys_regions": first.ephys_regions, "mix": first.mix}
        metrics = {f"test/{m}/{t}": float(gg.accuracy.mean()) for (m, t), gg in g.groupby(["modality", "task"])}
        for m, gg in g.groupby("modality"):
            metrics[f"test/{m}/mean"] = float(gg.accuracy.mean())
        writer = SummaryWriter(os.path.join(log_dir, point))
        writer.add_hparams(hparams, metrics, run_name=".")
        writer.close()
        n += 1
    return n
