"""Train state on disk: what a resumed run needs to continue exactly, loadable with weights_only=True.

A checkpoint is a directory ``RUN/ray/checkpoint_XXXXXXXX`` (the global step, 8 digits), written by
rank 0 in every mode (Ray Train's local mode persists no checkpoint, so the loop writes them itself,
the same way with or without workers: ``write_checkpoint``). It holds ``train_state.pt`` and, beside
it, ``train_state.pt.sha256`` (``sha256sum -c`` format), written last: a checkpoint is valid when the
checksum matches (``check_checkpoint``). ``find_checkpoint`` returns the newest valid one and the
invalid ones newer than it, so a resume falls back past a truncated or half-written file.
``train_state.pt`` holds:

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
``model_last.pt``) use ``trainer.model.io.save_checkpoint`` plus the same ``meta``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

from shards.atomic import atomic_path, write_atomic
from trainer.model.io import save_checkpoint

STATE_FILE = "train_state.pt"
CHECKSUM_FILE = STATE_FILE + ".sha256"
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")


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
    """Clear error when a checkpoint was made by another architecture variant or config. A field the
    checkpoint's config lacks (saved before the field existed) is that field's default, which is what the
    model it was saved from had."""
    if meta["variant"] != variant:
        raise ValueError(f"{what} holds a {meta['variant']!r} model, but this run builds {variant!r} "
                         f"(--model {meta['variant']} to continue it)")
    theirs = {**type(model_config)().to_dict(), **meta["model_config"]}
    ours = model_config.to_dict()
    diff = sorted(k for k in set(theirs) | set(ours)
                  if k not in ("amp", "amp_on_cpu", "compile", "attn_backend") and theirs.get(k) != ours.get(k))
    if diff:
        raise ValueError(f"{what} holds a {meta['variant']!r} model with another configuration than this run's: "
                         + ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs run {ours.get(k)!r}" for k in diff))


def checkpoint_dir(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "ray", f"checkpoint_{step:08d}")


def checkpoint_step(directory: str) -> int:
    m = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(directory)))
    if not m:
        raise ValueError(f"{directory}: not a checkpoint directory (checkpoint_XXXXXXXX)")
    return int(m.group(1))


def list_checkpoints(run_dir: str) -> list[str]:
    """The checkpoint directories under RUN/ray, newest (highest step) first."""
    root = os.path.join(run_dir, "ray")
    names = [n for n in os.listdir(root) if CHECKPOINT_RE.match(n)] if os.path.isdir(root) else []
    dirs = [os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))]
    return sorted(dirs, key=checkpoint_step, reverse=True)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_checkpoint(directory: str) -> str | None:
    """None when the checkpoint is whole; otherwise what is wrong, naming the file. A checkpoint
    without a checksum file (an older version's) is valid when it loads."""
    state, checksum = os.path.join(directory, STATE_FILE), os.path.join(directory, CHECKSUM_FILE)
    if not os.path.isfile(state):
        return f"{state}: missing"
    if not os.path.isfile(checksum):
        try:
            torch.load(state, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated zip, bad pickle, I/O error: all mean "not usable"
            return f"{state}: unreadable and no {CHECKSUM_FILE} ({type(exc).__name__}: " \
                   f"{(str(exc).strip().splitlines() or [''])[0][:100]})"
        return None
    try:
        with open(checksum) as fh:
            want = fh.read().split()[0].lower()
        if not re.fullmatch(r"[0-9a-f]{64}", want):
            raise ValueError
    except (OSError, ValueError, IndexError):
        return f"{checksum}: not a sha256 checksum file"
    try:
        got = file_sha256(state)
    except OSError as exc:
        return f"{state}: unreadable ({exc.strerror or exc})"
    if got != want:
        return (f"{state}: checksum mismatch ({os.path.getsize(state):,} bytes, sha256 {got[:12]}..., "
                f"{CHECKSUM_FILE} says {want[:12]}...)")
    return None


def find_checkpoint(run_dir: str) -> tuple[str | None, list[str]]:
    """(the newest valid checkpoint directory or None, the problems of the invalid ones newer than it,
    newest first): what a resume continues from, and what it skipped."""
    bad = []
    for d in list_checkpoints(run_dir):
        problem = check_checkpoint(d)
        if problem is None:
            return d, bad
        bad.append(problem)
    return None, bad


def latest_checkpoint(run_dir: str) -> str | None:
    """The newest valid checkpoint directory under RUN/ray, or None."""
    return find_checkpoint(run_dir)[0]


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
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def write_checkpoint(run_dir: str, step: int, *, keep: int | None = None, **state: Any) -> str:
    """RUN/ray/checkpoint_{step:08d}: ``save_train_state(**state)`` and its checksum, written beside the
    final place and renamed into it (an interrupted write leaves no checkpoint_* directory); then the
    checkpoints of later steps (invalid ones a resume fell back past) and all but the newest ``keep``
    are removed. Returns the directory."""
    final = checkpoint_dir(run_dir, step)
    root = os.path.dirname(final)
    tmp = os.path.join(root, f".{os.path.basename(final)}.tmp")
    os.makedirs(root, exist_ok=True)
    shutil.rmtree(tmp, ignore_errors=True)
    path = save_train_state(tmp, **state)  # fsynced
    write_atomic(os.path.join(tmp, CHECKSUM_FILE), f"{file_sha256(path)}  {STATE_FILE}\n")  # last: "whole"
    swap_directory(tmp, final)
    dirs = list_checkpoints(run_dir)
    for d in dirs:  # newer steps than this one: invalid ones a resume fell back past (it takes the newest valid)
        if checkpoint_step(d) > step:
            shutil.rmtree(d, ignore_errors=True)
    if keep is not None:
        for d in [d for d in dirs if checkpoint_step(d) <= step][keep:]:
            shutil.rmtree(d, ignore_errors=True)
        for name in os.listdir(root):  # what a killed writer left behind
            if name.startswith(".checkpoint_") and name != os.path.basename(tmp):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return final


def swap_directory(tmp: str, final: str) -> None:
    """Rename the directory ``tmp`` to ``final`` (its sibling), replacing a ``final`` already there; then
    fsync their parent. Not ``shards.atomic``: a directory cannot be os.replace'd over a non-empty one, so
    an existing ``final`` is first renamed aside (``.NAME.old``, removed after); a crash in between leaves
    no ``final``, and a resume falls back to the checkpoint before."""
    root = os.path.dirname(final)
    if os.path.exists(final):  # the same step again (a resume past an invalid checkpoint): replace it
        old = os.path.join(root, f".{os.path.basename(final)}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(root)


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_train_state(directory: str, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location=map_location, weights_only=True)


def save_model_file(path: str, model: torch.nn.Module, meta: str, **extra: Any) -> None:
    """``trainer.model.io.save_checkpoint`` (config, vocabulary sizes, state_dict) plus our meta, atomically."""
    with atomic_path(path) as tmp:
        save_checkpoint(model, tmp, meta=meta, **extra)


def load_model_file(path: str) -> dict:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if "meta" not in ck:
        raise ValueError(f"{path}: not a model file of trainer.train (no meta)")
    ck["meta"] = json.loads(ck["meta"])
    return ck
