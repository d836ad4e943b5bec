"""Checkpoints of the model and growth of its vocabularies (for finetuning on new recordings).

A checkpoint is a ``torch.save`` of plain types and tensors only, so it loads with
``torch.load(weights_only=True)`` and never unpickles an object::

    {"config": ModelConfig.to_dict(), "n_units": int, "n_sessions": int, "state_dict": ..., **extra}

``extra`` is whatever the caller stores beside the model (``trainer.checkpoint`` puts its JSON ``meta``
there). The state_dict keys are the model's attribute paths, so a checkpoint loads as long as those
paths stay (layers moving between modules does not change them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from trainer.model.config import ModelConfig
from trainer.model.network import MultiModalPOYO

MODEL_KEYS = ("config", "n_units", "n_sessions", "state_dict")  # what save_checkpoint writes besides extra


def save_checkpoint(model: MultiModalPOYO, path: str, **extra: Any) -> None:
    """``torch.save`` of plain types and tensors only: config dict, vocabulary sizes, state_dict, ``extra``."""
    torch.save({"config": model.config.to_dict(), "n_units": len(model.unit_emb),
                "n_sessions": len(model.session_emb), "state_dict": model.state_dict(), **extra}, path)


def read_checkpoint(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw dict ``save_checkpoint`` wrote, with ``torch.load(weights_only=True)``."""
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(ck: Mapping[str, Any], **config_changes: Any) -> MultiModalPOYO:
    """Rebuild the model from a checkpoint dict (``read_checkpoint``'s, or one a caller loaded itself).

    ``config_changes`` replace fields of the stored config before the model is built, for settings that
    shape execution but no parameter (``amp``, ``compile``, ``attn_backend``); a change that alters a
    parameter's shape fails in ``load_state_dict``."""
    config = ModelConfig.from_dict(ck["config"])
    if config_changes:
        config = config.replace(**config_changes)
    model = MultiModalPOYO(config=config, n_units=ck["n_units"], n_sessions=ck["n_sessions"])
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:  # torch's message spans lines: the first key it names is enough to act on
        detail = " ".join(str(exc).split("\n", 1)[-1].split())
        raise ValueError(f"its parameters do not fit the model its config builds ({detail[:300]})") from None
    return model


def load_checkpoint(path: str, map_location: str | torch.device = "cpu", **config_changes: Any) -> MultiModalPOYO:
    """Rebuild the model from ``save_checkpoint`` output (``config_changes``: see ``model_from_checkpoint``)."""
    return model_from_checkpoint(read_checkpoint(path, map_location), **config_changes)


def load_checkpoint_with_extra(path: str, map_location: str | torch.device = "cpu",
                               **config_changes: Any) -> tuple[MultiModalPOYO, dict[str, Any]]:
    """``load_checkpoint`` plus the ``extra`` entries the checkpoint was saved with (everything but
    ``MODEL_KEYS``), from one read of the file."""
    ck = read_checkpoint(path, map_location)
    return model_from_checkpoint(ck, **config_changes), {k: v for k, v in ck.items() if k not in MODEL_KEYS}


def grow_vocab(model: MultiModalPOYO, *, n_units: int = 0, n_sessions: int = 0) -> tuple[Tensor, Tensor]:
    """Add rows for new units / sessions, keeping the old ones bit for bit; returns the new rows' indices
    (units, sessions). Rebuild the optimizer afterwards (the embedding Parameters are replaced)."""
    if model.readout_emb is not None:
        model.readout_emb.grow(n_units)
    return model.unit_emb.grow(n_units), model.session_emb.grow(n_sessions)
