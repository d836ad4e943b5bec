"""The new rows' Gaussian prior (``unit_prior``, trainer.row_prior): fit per modality to the pretrained rows (pooled
where a modality has too few), its penalty the weighted mean Mahalanobis distance, and in a finetuning the new rows
start at its mean and are held nearer to it the heavier it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.runs import HELD_OUT, assert_refused_without_pretraining, short_pretraining
from tests.support.storegen import held_out_records, make_store
from trainer.checkpoint import load_model_file
from trainer.finetune import main as finetune
from trainer.row_prior import SHRINK, fit_row_prior


def shrunk_precision(x: np.ndarray) -> np.ndarray:
    cov = np.cov(x.T)
    return np.linalg.inv((1 - SHRINK) * cov + SHRINK * np.trace(cov) / len(cov) * np.eye(len(cov)))


def test_the_prior_is_each_modalitys_gaussian_and_its_penalty_the_mahalanobis_distance():
    rng = np.random.default_rng(0)
    dim = 4
    a = rng.normal(size=(40, dim)) * [1.0, 0.1, 0.1, 0.1] + 2.0  # 40 rows: enough for a modality's own fit
    b = rng.normal(size=(5, dim)) - 1.0  # 5 rows: too few, pooled
    table = torch.as_tensor(np.concatenate([a, b, rng.normal(size=(3, dim))]), dtype=torch.float32)
    known = {**{i: ("ephys", None) for i in range(40)}, **{40 + i: ("ophys", None) for i in range(5)}}
    new = {45: ("ephys", None), 46: ("ophys", None), 47: (None, None)}
    prior = fit_row_prior(table, known, new, weight=0.3)
    ab = np.concatenate([a, b])
    expect = {45: (a.mean(0), shrunk_precision(a)), 46: (ab.mean(0), shrunk_precision(ab)),
              47: (ab.mean(0), shrunk_precision(ab))}
    for i, r in enumerate(prior.rows.tolist()):
        mean, prec = expect[r]
        assert np.allclose(prior.mean[prior.group[i]].numpy(), mean, atol=1e-5)
        assert np.allclose(prior.precision[prior.group[i]].numpy(), prec, rtol=1e-4, atol=1e-3)
    x = table.numpy()
    hand = np.mean([(x[r] - expect[r][0]) @ expect[r][1] @ (x[r] - expect[r][0]) for r in (45, 46, 47)])
    assert prior.penalty(table).item() == pytest.approx(0.3 * 0.5 * hand, rel=1e-4)
    # the shrinkage: a direction the rows never vary in is stiff, not infinitely so
    flat = torch.as_tensor(np.concatenate([np.c_[rng.normal(size=(40, 3)), np.zeros(40)], np.ones((1, dim))]),
                           dtype=torch.float32)
    assert torch.isfinite(fit_row_prior(flat, dict.fromkeys(range(40), ("ephys", None)), {40: ("ephys", None)},
                                         1.0).penalty(flat))


def test_grouped_by_region_a_new_row_gets_its_regions_mean_and_the_spread_within_regions():
    rng = np.random.default_rng(1)
    dim = 3
    centre = {"VISp": np.array([3.0, 0.0, 0.0]), "VISl": np.array([-3.0, 1.0, 0.0])}
    noise = [1.0, 0.5, 0.2]
    p = rng.normal(size=(30, dim)) * noise + centre["VISp"]
    q = rng.normal(size=(25, dim)) * noise + centre["VISl"]
    few = rng.normal(size=(4, dim)) * noise  # VISal: too few rows for a mean of its own
    table = torch.as_tensor(np.concatenate([p, q, few, np.zeros((4, dim))]), dtype=torch.float32)
    known = {**{i: ("ephys", "VISp") for i in range(30)}, **{30 + i: ("ephys", "VISl") for i in range(25)},
             **{55 + i: ("ephys", "VISal") for i in range(4)}}
    new = {59: ("ephys", "VISp"), 60: ("ephys", "VISl"), 61: ("ephys", "VISal"), 62: ("ephys", "VISam")}
    prior = fit_row_prior(table, known, new, weight=1.0)
    within = np.concatenate([p - p.mean(0), q - q.mean(0), few - few.mean(0)])
    everything = np.concatenate([p, q, few])
    expect = {59: (p.mean(0), shrunk_precision(within)), 60: (q.mean(0), shrunk_precision(within)),
              61: (everything.mean(0), shrunk_precision(everything)),
              62: (everything.mean(0), shrunk_precision(everything))}
    for i, r in enumerate(prior.rows.tolist()):
        mean, prec = expect[r]
        assert np.allclose(prior.mean[prior.group[i]].numpy(), mean, atol=1e-5)
        assert np.allclose(prior.precision[prior.group[i]].numpy(), prec, rtol=1e-4, atol=1e-4)
    # the regions' own means are far apart, so the spread within them is far tighter than the modality's
    assert np.linalg.det(shrunk_precision(within)) > 10 * np.linalg.det(shrunk_precision(everything))


def test_an_empty_pretraining_is_refused():
    with pytest.raises(ValueError, match="no trained unit rows"):
        fit_row_prior(torch.zeros(3, 4), {}, {2: ("ephys", None)}, 1.0)


@pytest.fixture(scope="module")
def store_and_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rp")
    st = make_store(str(tmp / "store"), held_out_records())
    return st, short_pretraining(st.uri, tmp / "pre", HELD_OUT)


def finetuned_rows(store, pretrained, out, *flags: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(pretrained table, the finetuning's table after epoch 0, number of pretrained rows)."""
    finetune(["--from", str(pretrained), "--shards", store.uri, "--sessions", ",".join(HELD_OUT), "--out", str(out),
              "--workers", "0", "--batch-size", "8", "--loader-workers", "0", "--epochs", "1",
              "--unfreeze-epoch", "1", "--save-epoch-models", *flags])
    pre = load_model_file(str(pretrained / "model_best.pt"))
    old = pre["state_dict"]["unit_emb.weight"]
    return old, load_model_file(str(out / "model_epoch0.pt"))["state_dict"]["unit_emb.weight"], len(old)


def test_a_finetunings_new_rows_start_at_the_prior_mean_and_a_heavier_prior_holds_them_nearer(store_and_run, tmp_path):
    store, pretrained = store_and_run
    pre = load_model_file(str(pretrained / "model_best.pt"))
    trained = [i for i, u in enumerate(pre["meta"]["unit_ids"]) if u.split("/")[0] not in HELD_OUT]
    old, start, n_old = finetuned_rows(store, pretrained, tmp_path / "start", "--unit-prior", "1e-3", "--lr", "1e-12",
                                      "--unit-prior-groups", "region")
    assert torch.equal(start[:n_old], old)
    # 12 EPhys and 10 OPhys trained rows of width 32: too few for a modality's own fit (let alone a region's), so
    # the pooled mean
    assert torch.allclose(start[n_old:], old[trained].mean(0).expand_as(start[n_old:]), atol=1e-6)
    assert len(start) - n_old == 11
    mean = old[trained].mean(0)
    spread = {}
    for weight in ("1e-6", "1e3"):
        _, rows, _ = finetuned_rows(store, pretrained, tmp_path / weight, "--unit-prior", weight, "--lr", "3e-2")
        spread[weight] = (rows[n_old:] - mean).norm(dim=1).mean().item()
    assert spread["1e3"] < 0.5 * spread["1e-6"]
    # the penalty is logged beside the loss (TensorBoard): 0 at the first step (the rows at the mean), then larger
    # under the heavier weight
    logged = {w: [e.value for e in tb_scalars(tmp_path / w / "tb", "train/row_prior")] for w in spread}
    assert len(logged["1e-6"]) > 1 and logged["1e-6"][0] == logged["1e3"][0] == 0.0
    assert min(logged["1e3"][1:]) > max(logged["1e-6"]) > 0


def tb_scalars(folder, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []


def test_a_prior_without_a_pretrained_model_is_refused(store_and_run, tmp_path):
    assert_refused_without_pretraining(*store_and_run, tmp_path / "s", "unit_prior", "--unit-prior", "1e-2")
