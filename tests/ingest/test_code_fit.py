"""The corpus observer (ingest/synth/code_fit.py): the stimulus code estimated from pretraining sessions, then the
new-session observer with it on a held-out session."""

from __future__ import annotations

import numpy as np
import pytest

from ingest.synth import SynthConfig
from ingest.synth.code_fit import ClassCounts, corpus_observer, fit_class_codes, main
from ingest.synth.corpus import synthesize_session
from ingest.synth.generative import draw_corpus_model, softplus
from ingest.synth.ideal import summarize
from ingest.synth.new_session import new_session_predictions
from tests.ingest.test_ideal import ingest_in_process

#: Two EPhys sessions (no OPhys), 2 regions x 20 units, 500 s each
CONFIG = SynthConfig(duration_s=500.0, units_per_region=20, regions_per_ephys=2, unassigned_units=0)
PRE, HELD = "ephys_synth-ephys-000", "ephys_synth-ephys-002"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("code_fit")
    model = draw_corpus_model(11, CONFIG)
    for index in (0, 2):
        synthesize_session(root / "src", index, seed=11, config=CONFIG, model=model)
    return root / "src", ingest_in_process(root / "src", root / "store")


def test_the_fit_is_the_maximum_likelihood_code_and_recovers_the_truth_from_ample_counts():
    rng = np.random.default_rng(0)
    n_units, dim, n_classes = 300, 4, 5
    truth = rng.normal(size=(n_classes, dim)) / 2
    x = rng.normal(size=(n_units, dim))
    gain, base = rng.uniform(1, 4, n_units), rng.uniform(1, 5, n_units)
    seconds = np.full((n_units, n_classes), 40.0)
    counts = rng.poisson(seconds * (base[:, None] + gain[:, None] * softplus(x @ truth.T))).astype(float)
    ev = ClassCounts(counts, seconds, x, gain, base)
    code = fit_class_codes(ev)
    assert np.corrcoef(code.ravel(), truth.ravel())[0, 1] > 0.98

    def nll(c):
        rate = base[:, None] + gain[:, None] * softplus(x @ c.T)
        return float((seconds * rate - counts * np.log(rate)).sum())

    for _ in range(5):  # no small move lowers the Poisson negative log-likelihood: a (local) optimum
        assert nll(code) <= nll(code + 1e-3 * rng.normal(size=code.shape))


def test_codes_from_a_pretraining_session_decode_a_held_out_one_near_the_told_observer(corpus):
    src, store = corpus
    told = summarize(new_session_predictions(str(store), str(src), [HELD]))
    rows, agreement = corpus_observer(str(store), str(src), [PRE], [HELD], joint=0, told_form_only=False)
    assert agreement is not None and min(agreement.values()) > 0.7, agreement  # in the truth's coordinates
    assert [(r.region, r.task, r.n) for r in rows] == [(r.region, r.task, r.n) for r in told]
    acc_told = np.mean([r.accuracy for r in told])
    acc = np.mean([r.accuracy for r in rows])
    assert 0.85 * acc_told < acc <= acc_told + 0.05, (acc, acc_told)
    # units and code both learnt, regions' tuning not told: still far above chance and near the told observer
    blind, none = corpus_observer(str(store), str(src), [PRE], [HELD])
    assert none is None
    assert np.mean([r.accuracy for r in blind]) > 0.8 * acc_told


def test_a_session_without_truth_or_spikes_is_a_one_line_error(corpus, capsys):
    src, store = corpus
    assert main(["--store", str(store), "--truth", str(src), "--pretraining", "ophys_synth-ophys-001",
                 "--held-out", HELD]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "ophys_synth-ophys-001" in err
