"""New units' rows from their train-split responses (``unit_init=tuning``): the ridge map recovers a linear
map and picks its strength without the new sessions; the features see one unit's preferred class; a
finetuning run writes the predicted rows (old rows bit for bit), and a store without enough pretraining
sessions of a modality is refused in one line before training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shards.schema import TASKS
from shards.stream.plan import PlanConfig
from tests.support.runs import short_pretraining
from tests.support.storegen import held_out_records, make_store
from trainer.checkpoint import load_model_file
from trainer.config import ConfigError, TrainConfig
from trainer.finetune import finetune_config
from trainer.finetune import main as finetune
from trainer.train import run
from trainer.unit_init import _tuning, class_mean_columns, fit_ridge, pca_rows, predict_rows, response_features

HELD_OUT = ["e2", "o2"]
N_CLASSES = {name: task.n_classes for name, task in TASKS.items()}  # the store's tasks


def test_ridge_recovers_a_linear_map_and_is_scored_on_sessions_it_did_not_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 10))
    w = rng.normal(size=(10, 4))
    groups = np.repeat(["a", "b", "c"], 100)
    y = x @ w + 0.5 + 0.01 * rng.normal(size=(300, 4))
    weights, lam, r2 = fit_ridge(x, y, groups)
    assert r2 > 0.99 and lam == 1.0  # noiseless: the weakest strength of the grid wins
    assert np.allclose(weights[:-1], w, atol=0.05) and np.allclose(weights[-1], 0.5, atol=0.05)
    # pure noise targets: no strength predicts a held-out session, and the strongest shrinkage is picked
    _, lam_noise, r2_noise = fit_ridge(x, rng.normal(size=(300, 4)), groups)
    assert r2_noise < 0.05 and lam_noise == 1000.0


def test_tuning_features_mark_the_preferred_class_and_ignore_absent_presentations():
    y = np.array([0, 1, 2, 0, 1, 2])
    x = np.array([[1.0, 5.0], [9.0, 5.0], [1.0, 5.0], [1.0, np.nan], [9.0, 5.0], [1.0, 5.0]])
    z, stats = _tuning(x, y, k=4)  # class 3 is never shown
    assert z.shape == (2, 4) and stats.shape == (2, 2)
    assert z[0].argmax() == 1 and z[0, 0] < 0 and z[0, 3] == 0.0
    assert np.allclose(z[1], 0.0, atol=1e-3)  # a flat unit, its NaN presentation counting for nothing
    assert stats[1, 0] == pytest.approx(5.0)


@pytest.fixture(scope="module")
def store_and_run(tmp_path_factory):
    """The store and a short pretraining on its sessions but the held-out ones."""
    tmp = tmp_path_factory.mktemp("ui")
    st = make_store(str(tmp / "store"), held_out_records())
    return st, short_pretraining(st.uri, tmp / "pre", HELD_OUT)


def test_finetuning_starts_the_new_units_at_their_predicted_rows(store_and_run, tmp_path):
    store, pretrained = store_and_run
    out = tmp_path / "ft"
    finetune(["--from", str(pretrained), "--shards", store.uri, "--sessions", ",".join(HELD_OUT), "--out", str(out),
              "--workers", "0", "--batch-size", "8", "--loader-workers", "0", "--epochs", "1",
              "--unfreeze-epoch", "1", "--save-epoch-models", "--unit-init", "tuning", "--lr", "1e-12"])
    pre = load_model_file(str(pretrained / "model_best.pt"))
    ft = load_model_file(str(out / "model_epoch0.pt"))
    meta = ft["meta"]
    assert set(meta["unit_init"]) == {"ephys", "ophys"} and meta["unit_init"]["ephys"]["new_units"] == 6
    old_w, new_w = pre["state_dict"]["unit_emb.weight"], ft["state_dict"]["unit_emb.weight"]
    n_old = len(old_w)
    assert torch.equal(new_w[:n_old], old_w)  # the pretraining's rows, bit for bit (the rate is ~0)
    # the new rows are the map's prediction from the pretraining's units, recomputed here independently
    features, session_of, modality_of = response_features(store.uri, ["e0", "e1", "e2", "o0", "o1", "o2"],
                                                          N_CLASSES)
    ids = meta["unit_ids"]
    known = {u: old_w[i].numpy() for i, u in enumerate(pre["meta"]["unit_ids"])
             if session_of.get(u) in {"e0", "e1", "o0", "o1"}}
    rows, _ = predict_rows(features, known, ids[n_old:], session_of, modality_of, store.uri)
    for i, u in enumerate(ids[n_old:], start=n_old):
        assert np.allclose(new_w[i].numpy(), rows[u], atol=1e-5), u
    # the new sessions' rows start at the mean trained row of their modality
    s_old = pre["state_dict"]["session_emb.weight"]
    s_new = ft["state_dict"]["session_emb.weight"]
    sid = meta["session_ids"]  # the pretraining's (untrained rows of e2, o2 included), then the new rows
    ephys_rows = [i for i, s in enumerate(pre["meta"]["session_ids"]) if s in {"e0", "e1"}]
    assert torch.allclose(s_new[len(sid) - 1 - sid[::-1].index("e2")], s_old[ephys_rows].mean(0), atol=1e-6)


def test_a_store_with_one_pretraining_session_of_a_modality_is_refused_before_training(store_and_run, tmp_path):
    store = store_and_run[0]
    pre = short_pretraining(store.uri, tmp_path / "pre1", ["e1", "e2", "o2"], steps=4)
    out = tmp_path / "ft"
    with pytest.raises(SystemExit, match=r"^error: .*store: unit_init=tuning needs the train split of at least 2 "
                                         r"pretraining sessions of ephys in this store, found 1$"):
        finetune(["--from", str(pre), "--shards", store.uri, "--sessions", "e2,o2", "--out", str(out),
                  "--workers", "0", "--loader-workers", "0", "--unit-init", "tuning"])
    assert not (out / "metrics.json").exists()


def test_features_come_from_the_share_of_the_train_split_the_run_trains_on(store_and_run):
    store = store_and_run[0]
    full, *_ = response_features(store.uri, ["e0", "o0"], N_CLASSES)
    part, *_ = response_features(store.uri, ["e0", "o0"], N_CLASSES, PlanConfig(train_fraction=0.3))
    again, *_ = response_features(store.uri, ["e0", "o0"], N_CLASSES, PlanConfig(train_fraction=0.3))
    assert full.keys() == part.keys()
    assert all(np.array_equal(part[u], again[u]) for u in part)  # the run's subset, drawn by its seed
    assert sum(not np.allclose(part[u], full[u]) for u in part) == len(part)  # every unit sees less data




def test_pca_starts_units_tuned_alike_alike_whatever_their_mean_and_spread():
    rng = np.random.default_rng(0)
    means = class_mean_columns(N_CLASSES)
    profiles = rng.normal(size=(3, int(means.sum())))
    features, group = {}, {}
    for i in range(90):
        f = np.zeros(len(means))
        f[means] = profiles[i % 3] + 0.3 * rng.normal(size=int(means.sum()))
        f[~means] = 1000.0 * (i % 2)  # counts or dF/F: a scale the rows must not sort by
        features[f"s/{i}"], group[f"s/{i}"] = f, i % 3
    rows, fit = pca_rows(features, N_CLASSES, dim=32, scale=0.02, seed=0)
    assert fit["components"] == 16 and fit["units"] == 90
    x = np.stack([rows[u] for u in sorted(rows)])
    g = np.array([group[u] for u in sorted(rows)])
    assert x.shape == (90, 32) and 0.01 < x.std() < 0.03
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)
    same, other = g[:, None] == g[None], g[:, None] != g[None]
    assert d[same & ~np.eye(90, dtype=bool)].max() < d[other].min()


def test_a_fresh_model_starts_its_trained_units_at_their_pca_rows(store_and_run, tmp_path):
    store = store_and_run[0]
    out = tmp_path / "pca"
    run(TrainConfig(shards=store.uri, out=str(out), preset="small", batch_size=8, epoch_windows=8, max_steps=1,
                    workers=0, loader_workers=0, sessions_exclude=HELD_OUT, unit_init="pca", lr=1e-12))
    saved = load_model_file(str(out / "model_last.pt"))
    meta, w = saved["meta"], saved["state_dict"]["unit_emb.weight"]
    trained = ["e0", "e1", "o0", "o1"]  # every session with train chunks, not only those epoch 0 draws
    features, _, _ = response_features(store.uri, trained, N_CLASSES)
    rows, fit = pca_rows(features, N_CLASSES, w.shape[1], 0.02, seed=0)
    assert meta["unit_init"] == fit
    for i, u in enumerate(meta["unit_ids"]):
        if u in rows:
            assert np.allclose(w[i].numpy(), rows[u], atol=1e-5), u
    assert len(rows) < len(meta["unit_ids"])  # the held-out sessions' units keep their random rows


def test_a_pca_pretrainings_finetuning_starts_new_units_at_random_and_its_scratch_twin_at_pca(store_and_run, tmp_path):
    store = store_and_run[0]
    out = tmp_path / "pca"
    run(TrainConfig(shards=store.uri, out=str(out), preset="small", batch_size=8, epoch_windows=8, max_steps=1,
                    workers=0, loader_workers=0, sessions_exclude=HELD_OUT, unit_init="pca"))
    pretrained = finetune_config(str(out), store.uri, HELD_OUT, str(tmp_path / "ft"), "pretrained")
    scratch = finetune_config(str(out), store.uri, HELD_OUT, str(tmp_path / "sc"), "scratch")
    assert (pretrained.unit_init, scratch.unit_init) == ("random", "pca")
    pretrained.validate()
    scratch.validate()


def test_pca_is_refused_for_a_finetuning():
    with pytest.raises(ConfigError, match="pca starts a fresh model"):
        TrainConfig(shards="/nowhere", out="/tmp/x", init_from="/some/run", unit_init="pca").validate()

