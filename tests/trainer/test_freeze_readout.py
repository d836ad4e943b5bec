"""``--freeze-readout``: a finetuning keeps the pretrained likelihood readout (its maps from rows to encoding
parameters, its class codes and temperatures) as it is while the new rows, the decoder and the trunk train."""

from __future__ import annotations

import pytest
import torch

from tests.support.runs import HELD_OUT, assert_refused_without_pretraining, readout_pretraining
from trainer.checkpoint import load_model_file
from trainer.finetune import main as finetune


@pytest.fixture(scope="module")
def store_and_run(tmp_path_factory):
    return readout_pretraining(tmp_path_factory.mktemp("fr"))


def finetuned(store, pretrained, out, *flags: str) -> dict[str, torch.Tensor]:
    finetune(["--from", str(pretrained), "--shards", store.uri, "--sessions", ",".join(HELD_OUT), "--out", str(out),
              "--workers", "0", "--batch-size", "8", "--loader-workers", "0", "--epochs", "2", "--unfreeze-epoch", "1",
              "--lr", "1e-2", *flags])
    return load_model_file(str(out / "model_last.pt"))["state_dict"]


def test_a_frozen_readout_stays_as_pretrained_while_the_rest_trains(store_and_run, tmp_path):
    store, pretrained = store_and_run
    before = load_model_file(str(pretrained / "model_best.pt"))["state_dict"]
    readout = [k for k in before if k.startswith("likelihood_head.")]
    assert readout, "the pretraining has a likelihood readout"
    frozen = finetuned(store, pretrained, tmp_path / "frozen", "--freeze-readout")
    free = finetuned(store, pretrained, tmp_path / "free")
    for k in readout:
        assert torch.equal(frozen[k], before[k]), k
    assert any(not torch.equal(free[k], before[k]) for k in readout)
    # the decoder and the trunk still train after the unfreezing epoch
    for part in ("task_emb.", "dec_ffn.", "trunk."):
        names = [n for n in before if n.startswith(part)]
        assert names and any(not torch.equal(frozen[n], before[n]) for n in names), part


def test_freezing_a_readout_without_a_pretrained_model_is_refused(store_and_run, tmp_path):
    assert_refused_without_pretraining(*store_and_run, tmp_path / "s", "freeze_readout", "--freeze-readout")
