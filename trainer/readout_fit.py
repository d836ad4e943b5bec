"""A full-batch fit of the likelihood readout's EPhys encoding model and its class codes to the pretraining
sessions' presentation-aligned spike counts, before a finetuning (``TrainConfig.readout_fit``: its number of steps;
0, off, by default).

Why (docs/model.md section 24): the readout (``trainer.model.likelihood``) is a Poisson GLM per unit with a
shared code, and the pretraining fits it only through the queries of 32 windows a step, beside the decoder's
cross-entropy. It ends far from that GLM's optimum: on the benchmark's seed 0 its pretraining units' class rates
correlate with the generator's at 0.93 / 0.82 / 0.90 (static gratings / drifting gratings / natural scenes),
where 50 full-batch steps on the same sessions' train-split counts reach 0.98 / 0.94 / 0.98, and the corpus
observer (``ingest.synth.code_fit``: the generator's form fit to convergence on the same data) 0.99 / 0.98 /
0.99. The held-out session's units are then read through a code that is off. This fit moves the pretrained EPhys
units' rows, the EPhys map from a row to its parameters and the class codes (Adam, full batch, ``LR``); the
finetuning then trains as it would have, from there. The finetuning's store holds the pretraining sessions (the
checkpoint names them), and only their train split is read.

Counts are each unit's spikes in ``[start + latency, end + latency)`` of every labelled presentation whose
midpoint is in a train chunk (``trainer.presentations``, the per-session decoders' features), with the readout's
EPhys latency. OPhys is left as it is: its readout reads the calcium through a filter whose full-batch fit was not
built. Fitting the new units' rows the same way before the finetuning (their rows only, under the row prior and with
each unit's task sharpness held near the pretrained mean) was measured and dropped: seed 0 held out EPhys 0.718 /
0.509 / 0.681 against 0.733 / 0.575 / 0.682 without any fit (section 24).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shards.schema import MODALITY_INDEX
from trainer.model.network import MultiModalPOYO
from trainer.presentations import iter_records, record_durations, record_features

EPHYS = MODALITY_INDEX["ephys"]  # the readout's EPhys map
LR = 3e-3  # Adam, full batch: 50 steps reach the fit above from a pretrained readout


@dataclass
class CountTable:
    """One EPhys record's train presentations of one task: counts (P, U) (NaN: a unit absent from the chunk),
    seconds (P,), labels (P,), and its units' model rows (U,)."""

    task: int
    rows: Tensor
    counts: Tensor
    seconds: Tensor
    label: Tensor


def count_tables(store: str, sessions: list[str], unit_row: dict[str, int], task_names: list[str | None],
                 latency: float) -> list[CountTable]:
    """The train-split count tables of the EPhys records of ``sessions`` (``unit_row``: unit id -> model row)."""
    out = []
    for rec in iter_records(store, sessions, ["train"]):
        if rec.modality != "ephys":
            continue
        rows = torch.tensor([unit_row[u] for u in rec.unit_ids])
        for t, name in enumerate(task_names):
            if name is None:
                continue
            x, y = record_features(rec.samples["train"], rec.columns, name, latency)
            if len(y):
                out.append(CountTable(t, rows, torch.tensor(x, dtype=torch.float32),
                                      torch.tensor(record_durations(rec.samples["train"], name), dtype=torch.float32),
                                      torch.tensor(y)))
    return out


def poisson_nll(model: MultiModalPOYO, tables: list[CountTable]) -> Tensor:
    """The summed Poisson negative log-likelihood of every present count under the readout."""
    head = model.likelihood_head
    total = torch.zeros(())
    for tb in tables:
        b, _, g, v, k = head.params(model.unit_rows(tb.rows), EPHYS)
        rate = head.rates(b, g, v, k, tb.task)[:, tb.label].T  # (P, U)
        ok = ~torch.isnan(tb.counts)
        n = torch.where(ok, tb.counts, torch.zeros_like(tb.counts))
        total = total + torch.where(ok, tb.seconds[:, None] * rate - n * torch.log(rate), 0.0).sum()
    return total


def fit(model: MultiModalPOYO, tables: list[CountTable], params: list[Tensor], steps: int, n_units: int) -> list[float]:
    """``steps`` Adam steps on ``params`` of the NLL per unit; returns the objective per step."""
    opt = torch.optim.Adam(params, lr=LR)
    trace = []
    for _ in range(steps):
        loss = poisson_nll(model, tables) / n_units
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    return trace


def fit_readout(model: MultiModalPOYO, store: str, *, pretraining: list[str], unit_row: dict[str, int],
                steps: int) -> list[float]:
    """The fit of the module doc on ``model`` in place; the objective per step (empty: no EPhys to fit)."""
    head = model.likelihood_head
    if head is None:
        raise ValueError("readout_fit needs the likelihood readout (model_overrides likelihood_readout=true)")
    tables = count_tables(store, pretraining, unit_row, head.tasks, model.config.likelihood_latency_ephys_s)
    if not tables:
        return []
    was_training = model.training
    model.eval()
    n_units = len({int(r) for tb in tables for r in tb.rows})
    trace = fit(model, tables, [model.unit_emb.weight, *head.codes.values(), *head.unit_map[EPHYS].parameters()],
                steps, n_units)
    model.train(was_training)
    return trace


def summary(trace: list[float]) -> list[float]:
    """The objective's first and last value (what a run's meta records)."""
    return [round(trace[0], 4), round(trace[-1], 4)] if trace else []
