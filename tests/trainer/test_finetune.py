"""Finetuning on held-out sessions: new unit/session embedding rows, gradual unfreezing (frozen weights
stay bit for bit until the unfreeze epoch, then train), test-split accuracy per task; the from-scratch
and per-session MLP baselines; a pretrained run of another variant is refused. Runs in Ray Train's
local mode (workers=0: the loop in this process), which keeps these tests fast."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from shards.stream.dataset import MixtureStream
from tests.support.runs import short_pretraining
from tests.support.storegen import held_out_records, make_store, uneven_records
from trainer.build import frozen_parameters
from trainer.checkpoint import load_model_file
from trainer.config import TrainConfig
from trainer.finetune import finetune_config
from trainer.finetune import main as finetune
from trainer.model.network import MultiModalPOYO
from trainer.score import score
from trainer.sessions import finetune_mix

HELD_OUT = ["e2", "o2"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(str(tmp_path_factory.mktemp("ft") / "store"), uneven_records())


@pytest.fixture(scope="module")
def pretrained(store, tmp_path_factory):
    """A short pretraining run that never sees the held-out sessions."""
    return short_pretraining(store.uri, tmp_path_factory.mktemp("pre") / "run", HELD_OUT)


def ft_args(store, pretrained, out, *extra):
    return ["--from", str(pretrained), "--shards", store.uri, "--sessions", ",".join(HELD_OUT), "--out", str(out),
            "--workers", "0", "--batch-size", "8", "--loader-workers", "0", *extra]


def model_of(path) -> tuple[MultiModalPOYO, dict]:
    ck = load_model_file(str(path))
    from trainer.model.config import ModelConfig

    m = MultiModalPOYO(config=ModelConfig.from_dict(ck["config"]), n_units=ck["n_units"], n_sessions=ck["n_sessions"])
    m.load_state_dict(ck["state_dict"])
    return m, ck["meta"]


def frozen_part(model: MultiModalPOYO) -> dict[str, torch.Tensor]:
    skip = {"unit_emb.weight", "session_emb.weight"}
    return {k: v for k, v in model.state_dict().items() if k not in skip}


def test_finetune_grows_vocab_and_unfreezes_gradually(store, pretrained, tmp_path):
    out = tmp_path / "ft"
    metrics = finetune(ft_args(store, pretrained, out, "--epochs", "2", "--unfreeze-epoch", "1",
                               "--save-epoch-models"))
    pre, pre_meta = model_of(pretrained / "model_best.pt")
    ep0, meta = model_of(out / "model_epoch0.pt")
    ep1, _ = model_of(out / "model_epoch1.pt")
    # new rows for the held-out sessions' units (e2: 6, o2: 8) and the two sessions; old rows kept in order
    assert len(ep0.unit_emb) == len(pre.unit_emb) + 14 and len(ep0.session_emb) == len(pre.session_emb) + 2
    assert meta["unit_ids"][:len(pre_meta["unit_ids"])] == pre_meta["unit_ids"]
    assert meta["new_sessions"] == HELD_OUT
    # epoch 0: only unit and session embeddings train; everything else is the pretrained weights, bit for bit
    for k, v in frozen_part(pre).items():
        assert torch.equal(v, frozen_part(ep0)[k]), k
    n_old = len(pre.unit_emb)
    assert not torch.equal(ep0.unit_emb.weight[n_old:], ep1.unit_emb.weight[n_old:])
    # epoch 1 (unfrozen): the rest trains too
    changed = [k for k, v in frozen_part(ep0).items() if not torch.equal(v, frozen_part(ep1)[k])]
    assert any(k.startswith("encoders.") for k in changed) and any(k.startswith("trunk.") for k in changed)
    assert any(k.startswith("heads.") for k in changed)
    # test-split accuracy per task, per modality and session
    test = metrics["test"]
    assert set(test["modality"]) == {"ephys", "ophys"}
    assert {e["session"] for e in test["record"].values()} <= set(HELD_OUT) and test["record"]
    for e in test["modality"].values():
        assert all(0 <= v["acc"] <= 1 for v in e["tasks"].values())
    assert "epoch 1: unfreezing" in open(out / "train.log").read()


@pytest.mark.parametrize("weights", ["best", "last"])
def test_the_test_split_scores_the_weights_asked_for_and_model_last_holds_the_last(weights, tmp_path):
    """``--test-weights``: the test split is scored with the best weights by validation or the last ones;
    model_last.pt is the last weights either way."""
    store = make_store(str(tmp_path / "store"), held_out_records())  # held-out sessions with a valid split
    pretrained = short_pretraining(store.uri, tmp_path / "pre", HELD_OUT, steps=4)
    out = tmp_path / "ft"
    metrics = finetune(ft_args(store, pretrained, out, "--epochs", "2", "--unfreeze-epoch", "1", "--save-epoch-models",
                               "--lr", "1e9", "--test-weights", weights))  # wrecked; epoch 0's score is not beaten
    best = torch.load(out / "model_best.pt", weights_only=True)
    last = torch.load(out / "model_last.pt", weights_only=True)
    assert best["step"] < last["step"]
    ep1, _ = model_of(out / "model_epoch1.pt")
    assert same(last["state_dict"], ep1.state_dict())
    # the best weights are kept for the test only when asked for (the last checkpoint carries them)
    state = torch.load(sorted((out / "ray").glob("checkpoint_*/train_state.pt"))[-1], weights_only=True)
    assert (state.get("best_model") is None) == (weights == "last")
    if weights == "best":
        assert same(state["best_model"], best["state_dict"])
    assert metrics["test"]["modality"] == score(str(out), ("test",), weights)["test"]["modality"]
    assert f"test split ({weights} weights)" in open(out / "train.log").read()


def same(a: dict, b: dict) -> bool:
    """Two state dicts hold the same numbers (NaNs equal: a wrecked model's)."""
    return a.keys() == b.keys() and all(torch.allclose(v, b[k], rtol=0, atol=0, equal_nan=True) for k, v in a.items())


def test_frozen_parameters_are_all_but_the_embeddings():
    from trainer.model.config import ModelConfig

    m = MultiModalPOYO(config=ModelConfig.small(), n_units=5, n_sessions=2)
    frozen = frozen_parameters(m, epoch=0, unfreeze_epoch=1)
    assert len(frozen) == len(list(m.parameters())) - 2
    assert all(p is not m.unit_emb.weight and p is not m.session_emb.weight for p in frozen)
    assert frozen_parameters(m, epoch=1, unfreeze_epoch=1) == []


def test_embeddings_train_at_their_own_multiple_of_the_rate_through_the_whole_schedule():
    from trainer.build import make_optimizer, make_scheduler
    from trainer.model.config import ModelConfig

    m = MultiModalPOYO(config=ModelConfig.small(), n_units=5, n_sessions=2)
    one = make_optimizer(TrainConfig(preset="small", lr=1e-3), m)
    assert len(one.param_groups) == 1
    cfg = TrainConfig(preset="small", lr=1e-3, embed_lr_scale=4.0)
    opt = make_optimizer(cfg, m)
    rest, emb = opt.param_groups
    assert {id(p) for p in emb["params"]} == {id(m.unit_emb.weight), id(m.session_emb.weight)}
    assert len(rest["params"]) + 2 == len(list(m.parameters()))
    sched = make_scheduler(cfg, opt, total_steps=10)
    for _ in range(7):  # into the cosine decay
        opt.step()
        sched.step()
    assert rest["lr"] < 1e-3
    assert emb["lr"] == pytest.approx(4.0 * rest["lr"])


def test_scratch_and_mlp_baselines_report_test_accuracy(store, pretrained, tmp_path, capsys):
    scratch = finetune(ft_args(store, pretrained, tmp_path / "scratch", "--mode", "scratch", "--epochs", "1"))
    m, meta = model_of(tmp_path / "scratch" / "model_last.pt")
    assert "finetuned_from" not in meta and len(m.unit_emb) == 28  # the store's vocabulary, fresh weights
    mlp = finetune(ft_args(store, pretrained, tmp_path / "mlp", "--mode", "mlp", "--epochs", "2"))
    for metrics in (scratch, mlp):
        assert set(metrics["test"]["modality"]) == {"ephys", "ophys"}
        assert os.path.exists(tmp_path / ("scratch" if metrics is scratch else "mlp") / "metrics.json")
    assert "test-split accuracy per task" in capsys.readouterr().out


def test_pretrained_run_of_another_variant_is_refused(store, pretrained, tmp_path):
    with pytest.raises(SystemExit, match="holds a 'main' model, but --model asks for 'separate'"):
        finetune(ft_args(store, pretrained, tmp_path / "x", "--model", "separate"))
    with pytest.raises(SystemExit, match="not in"):
        finetune(["--from", str(pretrained), "--shards", store.uri, "--sessions", "nope", "--out", str(tmp_path / "y")])


def test_a_checkpoint_saved_before_a_config_field_existed_reads_it_as_that_fields_default():
    """Small-preset checkpoints from before ``calcium_bin`` hold no such key: they had one token per frame."""
    from trainer.checkpoint import check_same_model
    from trainer.model.config import ModelConfig

    old = ModelConfig.small(calcium_bin=1).to_dict()
    del old["calcium_bin"]
    meta = {"variant": "main", "model_config": old}
    check_same_model(meta, "main", ModelConfig.small(calcium_bin=1), "old.pt")  # the same model: accepted
    with pytest.raises(ValueError, match="calcium_bin: checkpoint 1 vs run 3"):
        check_same_model(meta, "main", ModelConfig.small(), "old.pt")


def test_the_finetuning_mix_gives_every_record_the_same_share(store, pretrained, tmp_path):
    """e1 is two records (VISp, VISl), o1 one: EPhys gets two shares to OPhys's one, whatever the windows each holds;
    a --mix given on the command line wins."""
    assert finetune_mix(store.uri, ["e1", "o1"]) == "ephys=2,ophys=1"
    assert finetune_mix(store.uri, ["e2", "o1", "o2"]) == "ephys=1,ophys=2"
    with pytest.raises(ValueError, match="nope"):
        finetune_mix(store.uri, ["e1", "nope"])
    cfg = finetune_config(str(pretrained), store.uri, ["e1", "o1"], str(tmp_path / "a"), "pretrained")
    assert cfg.mix == "ephys=2,ophys=1"
    stream = MixtureStream(cfg.stream_config("train"))
    plan = stream.plan(0)
    share = {s.name: float(np.mean(plan.selector == i)) for i, s in enumerate(stream.selectors)}
    assert share == pytest.approx({"ephys": 2 / 3, "ophys": 1 / 3}, abs=0.01)


def test_a_model_file_whose_parameters_do_not_build_is_a_one_line_error_before_training(store, pretrained, tmp_path):
    """A model file from another version of the code (here: a buffer this version does not have) is refused in one
    line naming the file, and nothing is trained or written."""
    ck = torch.load(pretrained / "model_best.pt", weights_only=True)
    ck["state_dict"]["likelihood_head.tied_from"] = torch.tensor(-1)
    odd = tmp_path / "odd.pt"
    torch.save(ck, odd)
    (tmp_path / "config.yaml").write_text((pretrained / "config.yaml").read_text())  # the run's settings beside it
    with pytest.raises(SystemExit) as err:
        finetune(ft_args(store, odd, tmp_path / "ft"))
    message = str(err.value)
    assert "\n" not in message and str(odd) in message
    assert "do not fit the model" in message and "likelihood_head.tied_from" in message
    assert not (tmp_path / "ft" / "metrics.json").exists() and not (tmp_path / "ft" / "model_last.pt").exists()
