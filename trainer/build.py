"""What a worker trains: the model (fresh, or pretrained with grown vocabularies), the optimizer, the
learning-rate schedule, and which parameters gradual unfreezing holds still.

    model      the variant by name (trainer.model.variants) of the store's vocabulary, or (``init_from``)
               the pretrained model with rows for this run's new units and sessions (trainer.pretrained)
    optimizer  LAMB (paper preset) or AdamW (small), peak lr = ``TrainConfig.peak_lr``
    schedule   OneCycle over the run's total steps, stepped per batch; a resumed run whose length changed
               follows the new schedule from where it is (``restore_schedule``)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch_optimizer
from torch.optim.lr_scheduler import OneCycleLR

from shards.stream.dataset import MixtureStream
from shards.stream.plan import train_chunks
from trainer.checkpoint import make_meta
from trainer.config import TrainConfig
from trainer.model.variants import build_model as build_variant
from trainer.pretrained import load_pretrained
from trainer.row_prior import RowPrior
from trainer.unit_init import pca_rows, response_features


@dataclass
class Built:
    model: torch.nn.Module
    meta: str  # JSON: variant, model config, vocabulary ids in model-row order
    to_model: Callable[[dict], dict]  # store indices -> model rows (identity unless vocabularies were grown)
    prior: RowPrior | None = None  # finetuning with unit_prior: the new rows' Gaussian prior (trainer.row_prior)


def same_rows(batch: dict) -> dict:
    """A fresh model's rows are the store's indices."""
    return batch


def build_model(cfg: TrainConfig, stream: MixtureStream, rank: int = 0) -> Built:
    """A fresh model of the store's vocabulary, or (``init_from``) a pretrained one whose unit and session
    vocabularies grow to cover this run's sessions (trainer.pretrained).

    Rows started from the units' responses (``unit_init``) are computed on ``rank`` 0 only: DDP's wrapper
    broadcasts rank 0's parameters to every rank (as it does for the random init, which is seeded per rank), so
    the other ranks skip reading every train chunk for features they would overwrite."""
    vocab = stream.vocab
    trained = sorted(set(stream.chunks.session_id.to_numpy()[stream.plan(0).chunk]))
    if cfg.init_from:
        return Built(*load_pretrained(cfg, vocab, trained, init_rows=rank == 0))
    base = cfg.model_config()
    model = build_variant(cfg.model, base, n_units=len(vocab.units), n_sessions=len(vocab.sessions))
    init = {"unit_init": init_rows_by_pca(model, stream)} if cfg.unit_init == "pca" and rank == 0 else {}
    meta = make_meta(variant=cfg.model, model_config=base, unit_ids=sorted(vocab.units, key=vocab.units.get),
                     session_ids=sorted(vocab.sessions, key=vocab.sessions.get), trained_sessions=trained, **init)
    return Built(model, meta, same_rows)


@torch.no_grad()
def init_rows_by_pca(model: torch.nn.Module, stream: MixtureStream) -> dict:
    """``--unit-init pca``: the rows of the units of every session the run has train chunks of (not only those
    epoch 0 draws), from those chunks' responses (trainer.unit_init.pca_rows); returns the fit, for the meta."""
    n_classes = {t.name: t.out_dim for t in model.config.tasks}
    plan = stream.config.plan_config()
    sessions = sorted(set(stream.chunks.session_id.to_numpy()[train_chunks(stream.chunks, plan)]))
    features, _, _ = response_features(stream.config.store, sessions, n_classes, plan)
    weight = model.unit_emb.weight
    rows, fit = pca_rows(features, n_classes, weight.shape[1], model.unit_emb.init_scale, plan.seed)
    own = model.readout_emb.weight if getattr(model, "readout_emb", None) is not None else None
    for u, row in rows.items():
        weight[stream.vocab.units[u]] = torch.as_tensor(row, dtype=weight.dtype)
        if own is not None:  # the likelihood readout's own table starts from the same rows
            own[stream.vocab.units[u]] = torch.as_tensor(row, dtype=own.dtype)
    return fit


def make_optimizer(cfg: TrainConfig, net: torch.nn.Module) -> torch.optim.Optimizer:
    """LAMB (torch-optimizer, the papers') or AdamW, at the run's peak rate (``TrainConfig.optimizer_name``).
    With ``embed_lr_scale`` != 1 the unit and session embeddings are their own group at that multiple of the
    rate: finetuning's new rows start from noise while the rest arrives trained (docs/model.md section 9)."""
    params: list = list(net.parameters())
    if cfg.embed_lr_scale != 1.0:
        emb = net.param_groups()["embeddings"]
        ids = {id(p) for p in emb}
        params = [{"params": [p for p in params if id(p) not in ids], "lr": cfg.peak_lr},
                  {"params": emb, "lr": cfg.peak_lr * cfg.embed_lr_scale}]
    if cfg.optimizer_name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    return torch_optimizer.Lamb(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> OneCycleLR:
    """OneCycle, cosine: held at the peak for ``pct_start`` of the run (``div_factor`` 1: no warm-up), then
    decayed to peak / (div_factor x final_div_factor); each parameter group keeps its own peak."""
    return OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(1, total_steps),
                      pct_start=cfg.pct_start, div_factor=cfg.div_factor, final_div_factor=cfg.final_div_factor,
                      anneal_strategy="cos")


def restore_schedule(scheduler: OneCycleLR, state: dict, step: int, total_steps: int, say) -> None:
    """Load the scheduler; if the run's length changed (--resume --max-steps N), follow the new
    schedule from this step instead."""
    if state.get("total_steps") == scheduler.total_steps or step > total_steps:
        scheduler.load_state_dict(state)
        return
    say(f"the schedule changed ({state.get('total_steps')} -> {total_steps} steps): the learning rate follows "
        f"the new one from step {step}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.last_epoch = step - 1
        scheduler.step()


def frozen_parameters(net: torch.nn.Module, epoch: int, unfreeze_epoch: int,
                      keep_readout: bool = False) -> list[torch.nn.Parameter]:
    """Gradual unfreezing (papers' App. C): before ``unfreeze_epoch`` only the unit and session
    embeddings train; everything else is frozen. ``keep_readout``: the likelihood readout (its maps from rows
    to encoding parameters, its class codes and scales) stays frozen throughout (``freeze_readout``)."""
    readout = getattr(net, "likelihood_head", None)
    kept = list(readout.parameters()) if keep_readout and readout is not None else []
    if epoch >= unfreeze_epoch:
        return kept
    train = {id(p) for p in net.param_groups()["embeddings"]}
    return [p for p in net.parameters() if id(p) not in train]
