"""Does the model learn the units' tuning, not the windows? Small easy corpora, a few hundred steps of the
small model, accuracy on held-out windows next to a logistic regression.

- Drifting gratings (2 s, 8 directions, 20 units): the model learns tuning from spikes at all. It does
  not separate the small preset of before the learning changes from today's: drifting gratings need no
  fine timing.
- Static gratings (0.25 s back to back, 6 orientations, 30 units): four presentations share each 1-s
  window, so the decoder must read the spikes of its own presentation. This is the test that fails on
  the earlier small preset (heads of 8 rotated over their whole width from 0.1 ms, no time prior, latents
  every 0.25 s, default init): measured 0.41 and 0.37 (seeds 0, 1) on these valid windows after 300
  steps, against 0.89 / 0.94 / 0.93 (seeds 0, 1, 2) for today's preset (0.91 / 0.93 / 0.93 at width 64);
  the per-record logistic regression (``trainer.logreg``, presentation-aligned counts) reaches 0.96 on
  the test split.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ingest.records import Intervals, SessionRecord
from shards import manifest
from shards.schema import TASKS
from shards.store import Store
from shards.stream.dataset import MixtureStream, StreamConfig
from tests.support.storegen import make_store
from trainer.logreg import logreg_baseline
from trainer.model.config import ModelConfig
from trainer.model.network import MultiModalPOYO
from trainer.naive_bayes import naive_bayes_baseline
from trainer.presentations import record_features

THRESHOLD = 0.5  # drifting gratings, chance 0.125
SG_THRESHOLD = 0.75  # static gratings, chance 0.167
STEPS = 300


def tuned_record(dur: float = 900.0, n_units: int = 20, gain_hz: float = 6.0, seed: int = 0) -> SessionRecord:
    """Drifting gratings every 3 s (2 s each, 8 directions); units direction-tuned."""
    rng = np.random.default_rng(seed)
    dg = np.arange(2.0, dur - 3.0, 3.0)
    dg_label = rng.integers(0, 8, len(dg))
    pref = rng.uniform(0, 2 * np.pi, n_units)
    angle = dg_label * (2 * np.pi / 8)
    rates = 2.0 + gain_hz * np.exp(2.0 * (np.cos(angle[:, None] - pref[None, :]) - 1))  # (P, U)
    return responding_record(rng, "easy", dur, "drifting_gratings", dg, 2.0, dg_label, rates,
                             other=("static_gratings", 0.25))


def static_tuning(dur: float, n_units: int, gain_hz: float, seed: int):
    """(rng, onsets, labels, rates (6 orientations, units) in Hz) of ``static_record``."""
    rng = np.random.default_rng(seed)
    on = np.arange(1.0, dur - 1.0, 0.25)
    label = rng.integers(0, 6, len(on))
    pref = rng.uniform(0, np.pi, n_units)
    rates = 2.0 + gain_hz * np.exp(2.0 * (np.cos(2 * (np.arange(6)[:, None] * np.pi / 6 - pref[None, :])) - 1))
    return rng, on, label, rates


def static_record(dur: float = 600.0, n_units: int = 30, gain_hz: float = 12.0, seed: int = 0) -> SessionRecord:
    """Static gratings back to back (0.25 s each, 6 orientations); units orientation-tuned (2 Hz baseline,
    up to +12 Hz), responding 50 ms after onset for the presentation's 0.25 s."""
    rng, on, label, rates = static_tuning(dur, n_units, gain_hz, seed)
    return responding_record(rng, "sg", dur, "static_gratings", on, 0.25, label, rates[label],
                             other=("drifting_gratings", 2.0))


def responding_record(rng: np.random.Generator, name: str, dur: float, task: str, on: np.ndarray, length: float,
                      label: np.ndarray, rates: np.ndarray, other: tuple[str, float]) -> SessionRecord:
    """One EPhys record: every unit fires at 2 Hz throughout, plus ``rates[p] - 2`` Hz for ``length`` s from
    50 ms after each onset ``on[p]``; ``other`` is a second task with no presentations."""
    n_units = rates.shape[1]
    base = rng.poisson(2.0 * dur, n_units)
    times = [rng.uniform(0, dur, n) for n in base]
    units = [np.full(n, u) for u, n in enumerate(base)]
    for p, t0 in enumerate(on):  # extra spikes during each presentation (50 ms latency)
        extra = rng.poisson((rates[p] - 2.0) * length)
        for u in range(n_units):
            times.append(t0 + 0.05 + rng.uniform(0, length, extra[u]))
            units.append(np.full(extra[u], u))
    t, u = np.concatenate(times), np.concatenate(units).astype(np.int32)
    order = np.argsort(t, kind="stable")
    none = np.zeros(0)
    stim = [Intervals(task, on, on + length, label),
            Intervals(other[0], none, none + other[1], np.zeros(0, np.int64))]
    return SessionRecord(name, "ephys", "VISp", "m", f"{name}.nwb", [str(100 + i) for i in range(n_units)],
                         0.0, dur, stim, spike_times=t[order], spike_units=u[order])


def store_of(tmp_path_factory, record: SessionRecord) -> str:
    uri = str(tmp_path_factory.mktemp(record.session_id) / "store")
    make_store(uri, [record])
    return uri


def train_small(store: str, steps: int = STEPS, seed: int = 0) -> MultiModalPOYO:
    """The small preset trained in-process on the store's train windows (AdamW 2e-3, batch 16)."""
    torch.manual_seed(seed)
    train = MixtureStream(StreamConfig(store=store, mix="ephys=1", batch_size=16, seed=seed))
    model = MultiModalPOYO(config=ModelConfig.small(), n_units=len(train.vocab.units),
                           n_sessions=len(train.vocab.sessions))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    step = 0
    while step < steps:
        for batch in train:
            loss = model(batch)["loss"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
        train.epoch += 1
    return model.eval()


def accuracy(model: MultiModalPOYO, stream: MixtureStream, task: str) -> tuple[float, int]:
    """Per-query accuracy on ``task`` over the stream's windows, and the number of scored queries."""
    hits = total = 0
    with torch.no_grad():
        for batch in stream:
            out = model(batch)
            rows = out["query_index"][task]
            keep = batch["output_weights"][rows] > 0
            pred = out["logits"][task].argmax(-1)
            hits += int((pred[keep] == batch["output_labels"][rows][keep]).sum())
            total += int(keep.sum())
    return hits / max(total, 1), total


def window_counts(batch: dict, n_units: int) -> tuple[np.ndarray, np.ndarray]:
    """Spike counts per unit of every window that queries a drifting grating, and its label."""
    cu, cq = batch["input_cu_seqlens"].long(), batch["output_cu_seqlens"].long()
    xs, ys = [], []
    for j in range(len(cu) - 1):
        for q in range(int(cq[j]), int(cq[j + 1])):
            if int(batch["output_task_index"][q]) == 1 and float(batch["output_weights"][q]) > 0:
                xs.append(np.bincount(batch["input_unit_index"][cu[j]:cu[j + 1]].numpy(), minlength=n_units))
                ys.append(int(batch["output_labels"][q]))
    return np.array(xs, dtype=float).reshape(-1, n_units), np.array(ys)


@pytest.fixture(scope="module")
def easy_store(tmp_path_factory):
    return store_of(tmp_path_factory, tuned_record())


def test_small_model_learns_tuning_as_well_as_a_logistic_regression(easy_store):
    torch.manual_seed(0)
    train = MixtureStream(StreamConfig(store=easy_store, mix="ephys=1", batch_size=16, seed=0))
    valid = MixtureStream(StreamConfig(store=easy_store, split="valid", batch_size=32, seed=0))
    n_units = len(train.vocab.units)

    # logistic regression on the same windows (counts of the whole 1-s window)
    xtr, ytr = map(np.concatenate, zip(*[window_counts(b, n_units) for b in train]))
    xva, yva = map(np.concatenate, zip(*[window_counts(b, n_units) for b in valid]))
    w = torch.zeros(n_units, 8, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    xt = torch.tensor(np.sqrt(xtr), dtype=torch.float32)
    for _ in range(300):
        loss = F.cross_entropy(xt @ w, torch.tensor(ytr)) + 1e-3 * (w ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    logreg_acc = float(((torch.tensor(np.sqrt(xva), dtype=torch.float32) @ w).argmax(1).numpy() == yva).mean())

    model_acc, total = accuracy(train_small(easy_store), valid, "drifting_gratings")
    assert total >= 40
    assert logreg_acc >= THRESHOLD, f"the corpus is not easy enough: logistic regression {logreg_acc:.2f}"
    assert model_acc >= THRESHOLD, f"model {model_acc:.2f} on held-out windows (logistic regression {logreg_acc:.2f})"


@pytest.fixture(scope="module")
def static_store(tmp_path_factory):
    return store_of(tmp_path_factory, static_record())


def test_small_model_reads_the_spikes_of_its_own_presentation(static_store):
    """Static gratings four to a window: the earlier small preset stayed near 0.4 here (module docstring)."""
    logreg = logreg_baseline(static_store, ["sg"], {t: spec.n_classes for t, spec in TASKS.items()})
    logreg_acc = logreg["ephys"]["static_gratings"]
    valid = MixtureStream(StreamConfig(store=static_store, split="valid", batch_size=32, seed=0))
    model_acc, total = accuracy(train_small(static_store), valid, "static_gratings")
    assert total >= 200
    assert logreg_acc >= SG_THRESHOLD, f"the corpus is not easy enough: logistic regression {logreg_acc:.2f}"
    assert model_acc >= SG_THRESHOLD, f"model {model_acc:.2f} on held-out windows (logistic regression {logreg_acc:.2f})"


def test_plug_in_naive_bayes_reaches_the_true_rate_decoder_on_a_store(static_store):
    """1,400 train presentations (233 per orientation): the rates are learnt, so the plug-in decoder read from
    the store's train split matches the Bayes decoder that knows them, on the same test presentations."""
    nb = naive_bayes_baseline(static_store, ["sg"], {t: spec.n_classes for t, spec in TASKS.items()})
    row = nb["record"]["sg/VISp"]["static_gratings"]
    store = Store(static_store)
    tables = manifest.load(store)
    test = list(manifest.record_samples(store, tables.chunks.to_pandas(), "sg", "VISp", "test"))
    columns = {str(100 + u): u for u in range(30)}
    x, y = record_features(test, columns, "static_gratings", 0.05)  # the response window exactly
    lam = static_tuning(600.0, 30, 12.0, 0)[3] * 0.25  # expected counts in it
    true = (x @ np.log(lam).T - lam.sum(1)).argmax(1)
    ideal = float((true == y).mean())
    assert row["n"] == len(y) >= 200
    assert ideal > 0.8
    assert row["acc"] >= ideal - 0.03, f"plug-in {row['acc']:.3f} vs true-rate Bayes {ideal:.3f}"
