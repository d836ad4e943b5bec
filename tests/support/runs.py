"""Short training runs the tests start from (one definition, so every finetuning test starts alike)."""

from __future__ import annotations

from pathlib import Path

from trainer.config import TrainConfig
from trainer.train import run


def short_pretraining(store_uri: str, out: Path, held_out: list[str], steps: int = 12,
                      overrides: dict | None = None) -> Path:
    """``steps`` steps of the small preset in-process on every session but ``held_out`` (``overrides``: ModelConfig
    fields); the run folder."""
    run(TrainConfig(shards=store_uri, out=str(out), preset="small", batch_size=8, epoch_windows=80, max_steps=steps,
                    workers=0, loader_workers=0, sessions_exclude=held_out, log_every=4, report_every=100,
                    model_overrides=dict(overrides or {})))
    return out
