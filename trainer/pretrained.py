"""A pretrained model whose unit and session vocabularies grow to cover a finetuning run's sessions
(``--init-from``; papers' App. C: new recordings get new embedding rows, everything else is reused).

The store of the finetuning run numbers its units and sessions its own way; the model keeps its rows
(those the pretraining trained) and appends rows for what it never saw. ``load_pretrained`` returns
the grown model with a ``StoreToModel``, which maps every batch's store indices to model rows by id.
"""

from __future__ import annotations

import torch

from shards.stream.plan import PlanConfig
from trainer.checkpoint import load_model_file, make_meta
from trainer.config import TrainConfig
from trainer.model.config import ModelConfig
from trainer.model.io import grow_vocab, model_from_checkpoint
from trainer.readout_fit import fit_readout, summary
from trainer.row_prior import RowPrior, fit_row_prior, start_at_prior_mean
from trainer.sessions import session_modalities, unit_regions
from trainer.unit_init import predict_rows, response_features


def load_pretrained(cfg: TrainConfig, vocab, sessions_here: list[str], init_rows: bool = True):
    """The model in ``cfg.init_from`` with new unit and session rows for this run's sessions that it never
    trained on; returns (model, meta, to_model, prior), the third taking a batch's store indices to model rows,
    the last the new rows' Gaussian prior when ``unit_prior`` > 0 (trainer.row_prior; else None).
    ``init_rows`` False: leave the new rows random even with ``unit_init=tuning`` or a prior (a DDP rank other
    than 0, whose parameters rank 0's broadcast replaces)."""
    ck = load_model_file(cfg.init_from)
    meta = ck["meta"]
    model = model_from_checkpoint(ck, amp=cfg.bf16)  # bf16 as this run asks (it shapes no parameter)

    seen = set(meta["trained_sessions"])  # sessions whose embeddings the pretraining trained
    session_row = {s: i for i, s in enumerate(meta["session_ids"]) if s in seen}
    unit_row = {u: i for i, u in enumerate(meta["unit_ids"]) if session_of(u, seen) is not None}
    here = set(sessions_here)
    new_sessions = [s for s in sorted(here) if s not in session_row]
    new_units = [u for u in sorted(vocab.units, key=vocab.units.get)
                 if u not in unit_row and session_of(u, here) is not None]
    unit_new, session_new = grow_vocab(model, n_units=len(new_units), n_sessions=len(new_sessions))
    unit_row.update(zip(new_units, unit_new.tolist()))
    session_row.update(zip(new_sessions, session_new.tolist()))
    init = {}
    if cfg.unit_init == "tuning" and new_units and init_rows:
        init = init_from_responses(cfg, model, unit_row, session_row, new_units, new_sessions, seen | here)
    prior = None
    if cfg.unit_prior > 0 and new_units:
        modality = session_modalities(cfg.shards)
        regions = unit_regions(cfg.shards) if cfg.unit_prior_groups == "region" else {}
        prior = row_prior(model.unit_emb.weight, unit_row, set(new_units), seen | here, modality, regions,
                          cfg.unit_prior)
        if cfg.unit_init == "random" and init_rows:
            start_at_prior_mean(model.unit_emb.weight, prior)  # (new sessions' rows at their modality's mean
            # trained row too was level: docs/model.md section 20)

    if cfg.readout_fit and init_rows:
        init["readout_fit"] = summary(fit_readout(model, cfg.shards, pretraining=sorted(seen), unit_row=unit_row,
                                                  steps=cfg.readout_fit))

    to_model = StoreToModel.from_rows(vocab, unit_row, session_row)
    meta_out = make_meta(variant=meta["variant"], model_config=ModelConfig.from_dict(meta["model_config"]),
                         unit_ids=list(meta["unit_ids"]) + new_units,
                         session_ids=list(meta["session_ids"]) + new_sessions,
                         trained_sessions=sorted(seen | here), finetuned_from=cfg.init_from,
                         new_units=len(new_units), new_sessions=new_sessions, **init)
    return model, meta_out, to_model, prior


def row_prior(table, unit_row: dict[str, int], new_units: set[str], sessions: set[str], modality: dict[str, str],
              regions: dict[str, str], weight: float) -> RowPrior:
    """The new rows' prior from the trained ones, each unit's modality its session's (a unit whose session the
    store does not hold falls to the pooled fit) and its region from ``regions`` {unit id: region} (empty: the
    prior's groups are the modalities)."""
    def of(u: str) -> tuple[str | None, str | None]:
        return modality.get(session_of(u, sessions) or ""), regions.get(u)
    known = {r: of(u) for u, r in unit_row.items() if u not in new_units}
    return fit_row_prior(table, known, {unit_row[u]: of(u) for u in new_units}, weight)


@torch.no_grad()
def start_sessions_at_mean(table, session_row: dict[str, int], new_sessions: list[str],
                           modality: dict[str, str]) -> None:
    """Each new session's row = the mean trained row of its modality (a new session's row is otherwise the one
    input of the decoder that is pure noise); a modality without trained sessions keeps its noise."""
    for s in new_sessions:
        same = [r for t, r in session_row.items() if t not in new_sessions and modality.get(t) == modality.get(s)]
        if same:
            table[session_row[s]] = table[same].mean(0)


@torch.no_grad()
def init_from_responses(cfg: TrainConfig, model, unit_row: dict[str, int], session_row: dict[str, int],
                        new_units: list[str], new_sessions: list[str], sessions: set[str]) -> dict:
    """Overwrite the new units' rows with their predicted rows and each new session's row with the mean
    trained row of its modality (trainer.unit_init); returns {"unit_init": the fits} for the meta."""
    n_classes = {t.name: t.out_dim for t in model.config.tasks}
    plan = PlanConfig(window_s=cfg.window_s, seed=cfg.seed, train_fraction=cfg.train_fraction)
    features, session_of, modality_of = response_features(cfg.shards, sessions, n_classes, plan)
    new_set = set(new_units)
    weight = model.unit_emb.weight
    known = {u: weight[r].float().numpy() for u, r in unit_row.items() if u not in new_set}
    rows, fits = predict_rows(features, known, new_units, session_of, modality_of, cfg.shards)
    for u, row in rows.items():
        weight[unit_row[u]] = torch.as_tensor(row, dtype=weight.dtype)
    start_sessions_at_mean(model.session_emb.weight, session_row, new_sessions,
                           {session_of[u]: m for u, m in modality_of.items()})
    return {"unit_init": fits}


def session_of(unit_id: str, sessions: set[str]) -> str | None:
    """The session of a unit id ``"{session_id}/{local_id}"`` among ``sessions`` (ids may contain '/')."""
    parts = unit_id.split("/")
    for k in range(1, len(parts)):
        s = "/".join(parts[:k])
        if s in sessions:
            return s
    return None


class StoreToModel:
    """A batch's store indices (``input_unit_index``, ``sample_unit_index``, ``session_index``) -> the grown
    model's rows."""

    def __init__(self, unit_map: torch.Tensor, session_map: torch.Tensor):
        self.maps = {"input_unit_index": unit_map, "sample_unit_index": unit_map, "session_index": session_map}

    @classmethod
    def from_rows(cls, vocab, unit_row: dict[str, int], session_row: dict[str, int]) -> StoreToModel:
        """The maps of a store's vocabulary to model rows given by id (ids without a row go to row 0)."""
        units = torch.zeros(max(1, len(vocab.units)), dtype=torch.int64)
        for u, i in vocab.units.items():
            units[i] = unit_row.get(u, 0)
        sessions = torch.zeros(max(1, len(vocab.sessions)), dtype=torch.int64)
        for s, i in vocab.sessions.items():
            sessions[i] = session_row.get(s, 0)
        return cls(units, sessions)

    def __call__(self, batch: dict) -> dict:
        return {**batch, **{k: m.to(batch[k].device)[batch[k]] for k, m in self.maps.items() if k in batch}}
