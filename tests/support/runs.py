"""Short training runs the tests start from (one definition, so every finetuning test starts alike)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.storegen import held_out_records, make_store
from trainer.config import TrainConfig
from trainer.finetune import main as finetune
from trainer.train import run

#: the sessions ``readout_pretraining`` leaves out of its pretraining (one per modality)
HELD_OUT = ["e2", "o2"]


def short_pretraining(store_uri: str, out: Path, held_out: list[str], steps: int = 12,
                      overrides: dict | None = None) -> Path:
    """``steps`` steps of the small preset in-process on every session but ``held_out`` (``overrides``: ModelConfig
    fields); the run folder."""
    run(TrainConfig(shards=store_uri, out=str(out), preset="small", batch_size=8, epoch_windows=80, max_steps=steps,
                    workers=0, loader_workers=0, sessions_exclude=held_out, log_every=4, report_every=100,
                    model_overrides=dict(overrides or {})))
    return out


def readout_pretraining(tmp: Path):
    """A store of ``held_out_records`` and a short pretraining with the likelihood readout on all of it but
    ``HELD_OUT``: (store, run folder)."""
    st = make_store(str(tmp / "store"), held_out_records())
    return st, short_pretraining(st.uri, tmp / "pre", HELD_OUT, overrides={"likelihood_readout": True})


def assert_refused_without_pretraining(store, pretrained: Path, out: Path, field: str, *flags: str) -> None:
    """A finetuning from scratch with ``flags`` (which need a pretrained model) is refused naming ``field``, and
    writes no result."""
    with pytest.raises(SystemExit, match=rf"{field}.*needs a pretrained model"):
        finetune(["--from", str(pretrained), "--shards", store.uri, "--sessions", ",".join(HELD_OUT),
                  "--out", str(out), "--workers", "0", "--mode", "scratch", *flags])
    assert not (out / "metrics.json").exists()
