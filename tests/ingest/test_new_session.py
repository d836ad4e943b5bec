"""The new-session observer (ingest/synth/new_session.py): units' own parameters fit on the train split, the
corpus's shared model given, decoded like the ideal observer."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.synth import SessionTruth, SynthConfig, ideal, synthesize
from ingest.synth.generative import class_rates
from ingest.synth.new_session import fit_units, new_session_predictions, train_data
from shards import manifest
from shards.store import Store
from tests.ingest.test_ideal import ingest_in_process

#: One EPhys session, 2 regions x 15 units, 400 s: ~300 train presentations of gratings and of natural scenes.
CONFIG = SynthConfig(duration_s=400.0, units_per_region=15, regions_per_ephys=2, unassigned_units=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("new_session")
    synthesize(root / "src", sessions=1, seed=3, config=CONFIG)
    return root / "src", ingest_in_process(root / "src", root / "store")


def test_the_fit_recovers_each_units_tuning_from_the_train_split(corpus):
    src, store = corpus
    truth = SessionTruth.load(src / "ephys_synth-ephys-000")
    st = Store(str(store))
    tables = manifest.load(st)
    chunks = tables.chunks.to_pandas()
    units = tables.units.to_pandas()
    session = "ephys_synth-ephys-000"  # the store's id: modality + the file's session id
    index = {str(u): i for i, u in enumerate(truth.unit_ids)}
    for region in sorted(units.region.unique()):
        unit_index = np.asarray([index[u] for u in units[units.region == region].local_id])
        data = train_data(truth, unit_index, manifest.record_samples(st, chunks, session, region, "train"))
        fitted = fit_units(truth, unit_index, data)
        sub = ideal.subset_units(truth.units, unit_index)
        for task in ("static_gratings", "natural_scenes"):
            true_rates, fit_rates = class_rates(sub, truth.model, task), class_rates(fitted, truth.model, task)
            r = np.corrcoef(np.log(true_rates).ravel(), np.log(fit_rates).ravel())[0, 1]
            assert r > 0.9, (region, task, r)
        assert np.corrcoef(np.log(sub.baseline), np.log(fitted.baseline))[0, 1] > 0.8, region


def test_it_scores_the_ideal_observers_presentations_near_its_accuracy_and_worse_with_less_data(corpus):
    src, store = corpus
    best = ideal.ideal_predictions(str(store), str(src))
    fitted = new_session_predictions(str(store), str(src))
    key = lambda p: (p.session, p.region, p.task, p.start)  # noqa: E731
    assert sorted(map(key, fitted)) == sorted(map(key, [p for p in best if p.modality == "ephys"]))
    acc_ideal = np.mean([p.correct for p in best if p.modality == "ephys"])
    acc_fit = np.mean([p.correct for p in fitted])
    assert acc_fit > 0.9 * acc_ideal, (acc_fit, acc_ideal)
    scarce = np.mean([p.correct for p in new_session_predictions(str(store), str(src), train_fraction=0.05)])
    assert scarce < acc_fit, (scarce, acc_fit)
