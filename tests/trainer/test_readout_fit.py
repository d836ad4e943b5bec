"""``--readout-fit N``: before a finetuning, the likelihood readout's EPhys encoding model and class codes are fit
full-batch to the pretraining sessions' train-split presentation counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.support.runs import HELD_OUT, assert_refused_without_pretraining, readout_pretraining, short_pretraining
from trainer.checkpoint import load_model_file
from trainer.finetune import main as finetune
from trainer.model.io import model_from_checkpoint
from trainer.readout_fit import CountTable, count_tables, fit_readout, poisson_nll


@pytest.fixture(scope="module")
def store_and_run(tmp_path_factory):
    return readout_pretraining(tmp_path_factory.mktemp("rf"))


def test_the_objective_is_the_poisson_likelihood_of_each_present_count(store_and_run):
    _, pretrained = store_and_run
    model = model_from_checkpoint(load_model_file(str(pretrained / "model_best.pt")))
    head = model.likelihood_head
    rng = np.random.default_rng(0)
    counts = rng.poisson(2.0, size=(5, 3)).astype(np.float32)
    counts[1, 2] = np.nan  # a unit absent from a presentation's chunk: not scored
    tb = CountTable(task=1, rows=torch.tensor([0, 3, 7]), counts=torch.tensor(counts),
                    seconds=torch.tensor([0.25, 0.5, 1.0, 2.0, 0.3]), label=torch.tensor([0, 1, 2, 1, 0]))
    with torch.no_grad():
        nll = poisson_nll(model, [tb])
        b, _, g, v, kk = head.params(model.unit_rows(tb.rows), 0)
        rates = head.rates(b, g, v, kk, 1)
    expected = 0.0
    for p in range(5):
        for u in range(3):
            if not np.isnan(counts[p, u]):
                r = float(rates[u, tb.label[p]])
                expected += float(tb.seconds[p]) * r - counts[p, u] * np.log(r)
    assert float(nll) == pytest.approx(expected, rel=1e-5)


def test_count_tables_hold_every_train_presentation_of_each_ephys_record(store_and_run):
    store, pretrained = store_and_run
    meta = load_model_file(str(pretrained / "model_best.pt"))["meta"]
    unit_row = {u: i for i, u in enumerate(meta["unit_ids"])}
    tasks = [t["name"] for t in meta["model_config"]["tasks"]]
    tables = count_tables(store.uri, ["e0", "e1", "o0"], unit_row, tasks, 0.05)
    assert tables and all(int(r) in unit_row.values() for tb in tables for r in tb.rows)
    assert {unit_row[u] for u in unit_row if u.startswith("o0/")}.isdisjoint({int(r) for tb in tables for r in tb.rows})
    for tb in tables:
        assert tb.counts.shape == (len(tb.label), len(tb.rows)) and (tb.seconds > 0).all()
        present = tb.counts[~torch.isnan(tb.counts)]
        assert (present >= 0).all() and torch.equal(present, present.round())


def test_the_fit_lowers_the_counts_nll_moving_only_the_ephys_readout_its_rows_and_the_codes(store_and_run):
    store, pretrained = store_and_run
    ck = load_model_file(str(pretrained / "model_best.pt"))
    model = model_from_checkpoint(ck)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unit_row = {u: i for i, u in enumerate(ck["meta"]["unit_ids"])}
    trace = fit_readout(model, store.uri, pretraining=["e0", "e1", "o0", "o1"], unit_row=unit_row, steps=8)
    assert len(trace) == 8 and trace[-1] < trace[0]
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved >= {"likelihood_head.unit_map.0.weight", "unit_emb.weight"}
    assert any(k.startswith("likelihood_head.codes.") for k in moved)
    assert all(k.startswith(("likelihood_head.codes.", "likelihood_head.unit_map.0.")) or k == "unit_emb.weight"
               for k in moved), moved
    ephys_rows = [i for u, i in unit_row.items() if u.startswith(("e0/", "e1/"))]
    other = [i for i in range(len(unit_row)) if i not in ephys_rows]
    assert torch.equal(before["unit_emb.weight"][other], after["unit_emb.weight"][other])  # OPhys and new rows


def test_a_finetuning_records_the_fits_falling_objective(store_and_run, tmp_path):
    store, pretrained = store_and_run
    finetune(["--from", str(pretrained), "--shards", store.uri, "--sessions", ",".join(HELD_OUT),
              "--out", str(tmp_path / "ft"), "--workers", "0", "--batch-size", "8", "--loader-workers", "0",
              "--epochs", "1", "--lr", "1e-3", "--readout-fit", "6"])
    first, last = load_model_file(str(tmp_path / "ft" / "model_last.pt"))["meta"]["readout_fit"]
    assert last < first


def test_a_readout_fit_without_a_pretrained_model_is_refused(store_and_run, tmp_path):
    assert_refused_without_pretraining(*store_and_run, tmp_path / "s", "readout_fit", "--readout-fit", "5")


def test_a_readout_fit_of_a_model_without_a_readout_is_a_one_line_error(store_and_run, tmp_path):
    store, _ = store_and_run
    plain = short_pretraining(store.uri, tmp_path / "plain", HELD_OUT)
    with pytest.raises(SystemExit, match=r"^error: --readout-fit: --from .*plain.* has no likelihood readout"):
        finetune(["--from", str(plain), "--shards", store.uri, "--sessions", ",".join(HELD_OUT),
                  "--out", str(tmp_path / "ft"), "--workers", "0", "--readout-fit", "5"])
    assert not (tmp_path / "ft" / "metrics.json").exists()
