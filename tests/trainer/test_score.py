"""``trainer.score``: a run's model scored on the chunks it trained on, beside valid and test, through the same
evaluation as training's (so a finetuned model's test figure is reproduced exactly from its file)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from shards import manifest
from shards.stream.plan import PlanConfig, plan_eval, train_chunks
from tests.support.runs import short_pretraining
from tests.support.storegen import ephys, make_store, ophys
from trainer.finetune import main as finetune
from trainer.score import main as score_cli
from trainer.score import score

HELD_OUT = ["e2"]


@pytest.fixture(scope="module")
def store_and_runs(tmp_path_factory):
    """A store, a short pretraining on all but e2, and a one-epoch finetuning of it on e2 (grown vocabulary)."""
    tmp = tmp_path_factory.mktemp("score")
    st = make_store(str(tmp / "store"), [ephys("e0", "VISp", 150.0, seed=1), ephys("e2", "VISp", 120.0, seed=3,
                                                                               first_id=200),
                                         ophys("o0", "VISp", 150.0, seed=4)])
    pre = short_pretraining(st.uri, tmp / "pre", HELD_OUT)
    ft = tmp / "ft"
    finetune(["--from", str(pre), "--shards", st.uri, "--sessions", "e2", "--out", str(ft), "--workers", "0",
              "--batch-size", "8", "--loader-workers", "0", "--epochs", "1", "--unfreeze-epoch", "0"])
    return st, pre, ft


def test_the_train_split_is_scored_on_exactly_the_chunks_training_draws_from(store_and_runs):
    st = store_and_runs[0]
    chunks = manifest.load(st).chunks.to_pandas()
    for fraction in (1.0, 0.5):
        cfg = PlanConfig(sessions_exclude=tuple(HELD_OUT), train_fraction=fraction)
        planned = set(plan_eval(chunks, "train", cfg).chunk.tolist())
        assert planned == set(np.nonzero(train_chunks(chunks, cfg))[0].tolist())
    assert len(set(plan_eval(chunks, "train", PlanConfig(train_fraction=0.5)).chunk.tolist())) < \
        len(set(plan_eval(chunks, "train", PlanConfig()).chunk.tolist()))


def test_scores_a_run_on_its_own_sessions_and_reproduces_a_finetuned_models_test_figure(store_and_runs):
    _, pre, ft = store_and_runs
    res = score(str(pre), ("train", "valid"))
    assert {r.split("/")[0] for r in res["train"]["record"]} == {"e0", "o0"}  # e2 was held out
    assert set(res["train"]["modality"]) == {"ephys", "ophys"}
    # the finetuned model's rows are found by id in its grown vocabulary: its own test figures, to the digit
    mine = score(str(ft), ("test",))["test"]
    theirs = json.loads((ft / "metrics.json").read_text())["test"]
    assert mine["pooled"]["modality"]["ephys"]["loss"] == pytest.approx(theirs["pooled"]["modality"]["ephys"]["loss"],
                                                                         rel=1e-5)
    assert mine["modality"] == theirs["modality"]  # accuracies are counts: exactly equal


def test_bad_input_is_one_line(tmp_path, capsys):
    assert score_cli([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.yaml" in err and "\n" not in err
    assert score_cli([str(tmp_path), "--splits", "train,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
