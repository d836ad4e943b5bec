"""Train state on disk: what a resumed run needs to continue exactly, loadable with weights_only=True.

A checkpoint directory (one per ``ray.train.report``, written by rank 0) holds ``train_state.pt``:

    meta        JSON string: model variant, ModelConfig, vocabulary ids (model row order), run info
    model       model state_dict
    optimizer   optimizer state_dict (LAMB)
    scheduler   scheduler state_dict (OneCycleLR)
    stream      StreamLoader.state_dict(): epoch and global windows consumed (the next batch, exactly)
    progress    step, epoch, best score, validations without improvement, ...
    rng         one dict per rank: torch (+cuda), numpy, python RNG states, as tensors and ints
    best_model  (optional) the best weights so far, when the run evaluates them at the end

Only plain types and tensors: configs travel as JSON strings, numpy states as tensors, so
``torch.load(..., weights_only=True)`` never unpickles an object. Model-only files (``model_best.pt``,
``model_last.pt``) use ``trainer.model.save_checkpoint`` plus the same ``meta``.
"""

from __future__ import annotations

import glob
import json
import os
import random
from typing import Any

import numpy as np
import torch

STATE_FILE = "train_state.pt"


# ---- metadata: which model this is --------------------------------------------------------------

def make_meta(*, variant: str, model_config, unit_ids: list[str], session_ids: list[str],
              trained_sessions: list[str], **extra: Any) -> str:
    return json.dumps({"variant": variant, "model_config": model_config.to_dict(), "unit_ids": list(unit_ids),
                       "session_ids": list(session_ids), "trained_sessions": sorted(trained_sessions), **extra})


def read_meta(path: str) -> dict:
    """The meta of a train_state.pt / model file (or of the checkpoint directory holding one)."""
    if os.path.isdir(path):
        path = os.path.join(path, STATE_FILE)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if "meta" not in ck:
        raise ValueError(f"{path}: not a checkpoint of trainer.train (no meta)")
    return json.loads(ck["meta"])


def check_same_model(meta: dict, variant: str, model_config, what: str) -> None:
    """Clear error when a checkpoint was made by another architecture variant or config."""
    if meta["variant"] != variant:
        raise ValueError(f"{what} holds a {meta['variant']!r} model, but this run builds {variant!r} "
                         f"(--model {meta['variant']} to continue it)")
    theirs, ours = meta["model_config"], model_config.to_dict()
    diff = sorted(k for k in set(theirs) | set(ours)
                  if k not in ("amp", "amp_on_cpu", "compile", "attn_backend") and theirs.get(k) != ours.get(k))
    if diff:
        raise ValueError(f"{what} holds a {meta['variant']!r} model with another configuration than this run's: "
                         + ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs run {ours.get(k)!r}" for k in diff))


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint directory (highest step) that Ray persisted under RUN/ray, or None."""
    dirs = [d for d in glob.glob(os.path.join(run_dir, "ray", "checkpoint_*"))
            if os.path.exists(os.path.join(d, STATE_FILE))]
    return max(dirs, key=lambda d: int(os.path.basename(d).split("_")[1])) if dirs else None


# ---- random number generators -------------------------------------------------------------------

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def _plain(x):
    return x.item() if hasattr(x, "item") else x


# ---- the train state ----------------------------------------------------------------------------

def save_train_state(directory: str, *, meta: str, model: torch.nn.Module, optimizer, scheduler, stream: dict,
                     progress: dict, rng: list[dict], best_model: dict | None = None) -> str:
    os.makedirs(directory, exist_ok=True)
    state = {"meta": meta, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "stream": dict(stream), "progress": dict(progress), "rng": rng}
    if best_model is not None:
        state["best_model"] = best_model
    path = os.path.join(directory, STATE_FILE)
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_train_state(directory: str, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location=map_location, weights_only=True)


def save_model_file(path: str, model: torch.nn.Module, meta: str, **extra: Any) -> None:
    """``trainer.model.save_checkpoint`` (config, vocabulary sizes, state_dict) plus our meta, atomically."""
    from trainer.model import save_checkpoint

    save_checkpoint(model, path + ".tmp", meta=meta, **extra)
    os.replace(path + ".tmp", path)


def load_model_file(path: str) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if "meta" not in ck:
        raise ValueError(f"{path}: not a model file of trainer.train (no meta)")
    ck["meta"] = json.loads(ck["meta"])
    return ck
