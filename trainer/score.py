"""``python -m trainer.score RUN``: a finished run's model scored on the data it trained on, beside valid and test.

Why: a held-out accuracy below the optimum says nothing about the cause on its own. Scored the same way (one
prediction per presentation from overlapping windows, accuracy per record, mean over records) on the train split
too, a model that is as far from the optimum on the presentations it trained on as on new ones is short of
capacity or of steps (underfitting); one far above on the train split has memorised them (overfitting).
docs/model.md section 13 reads the benchmark's runs this way.

The run's own sessions and store (``RUN/config.yaml``) and its model file (``model_best.pt`` by default); the
model's vocabulary (the file's meta) is matched to the store's by id, so pretrained, finetuned and scratch runs
all score. Nothing is trained or written unless ``--json`` asks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

from shards.atomic import write_atomic
from shards.stream.dataset import MixtureStream
from shards.stream.loader import StreamLoader
from trainer.checkpoint import load_model_file
from trainer.config import ConfigError, TrainConfig, load_yaml
from trainer.evaluate import evaluate
from trainer.model.io import model_from_checkpoint
from trainer.pretrained import StoreToModel, session_of
from trainer.report import headline

SPLITS = ("train", "valid", "test")


def run_config(run: str) -> TrainConfig:
    """The run's TrainConfig, from ``RUN/config.yaml``."""
    path = os.path.join(run, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file (not a run folder of trainer.train or trainer.finetune)")
    return load_yaml(path)[0]


def store_to_model(meta: dict, stream: MixtureStream, path: str) -> StoreToModel:
    """Store indices -> the model's rows, matched by unit and session id; a unit of a session the stream scores
    without a row is an error (the model never trained on it)."""
    unit_row = {u: i for i, u in enumerate(meta["unit_ids"])}
    scored = set(stream.chunks.session_id.to_numpy()[stream.plan(0).chunk])
    lost = [u for u in stream.vocab.units if u not in unit_row and session_of(u, scored) is not None]
    if lost:
        raise ValueError(f"{path}: the model has no row for unit {lost[0]!r}")
    return StoreToModel.from_rows(stream.vocab, unit_row, {s: i for i, s in enumerate(meta["session_ids"])})


def score(run: str, splits: tuple[str, ...] = SPLITS, weights: str = "best") -> dict[str, dict]:
    """{split: evaluation summary (trainer.tally)} of the run's ``model_{weights}.pt`` on its sessions."""
    cfg = run_config(run)
    path = os.path.join(run, f"model_{weights}.pt")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such model file (weights 'best' or 'last')")
    ck = load_model_file(path)
    try:
        model = model_from_checkpoint(ck, amp=cfg.bf16)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    out = {}
    for split in splits:
        sc = dataclasses.replace(cfg.stream_config(split), score_train=True)
        stream = MixtureStream(sc)
        vocab = stream.vocab
        tally = evaluate(model, StreamLoader(stream, num_workers=0),
                         session_ids=sorted(vocab.sessions, key=vocab.sessions.get),
                         record_ids=sorted(vocab.records, key=vocab.records.get), device=torch.device("cpu"),
                         to_model=store_to_model(ck["meta"], stream, path))
        out[split] = tally.summary()
    return out


def table(summaries: dict[str, dict]) -> str:
    """modality, task, then the headline metric on each split."""
    splits = list(summaries)
    rows = {}
    for split, summary in summaries.items():
        for mod, e in summary.get("modality", {}).items():
            for task, v in e["tasks"].items():
                rows.setdefault((mod, task), {})[split] = headline(v)[1]
    lines = [f"{'modality':8} {'task':18} " + " ".join(f"{s:>7}" for s in splits)]
    for (mod, task), by in rows.items():
        lines.append(f"{mod:8} {task:18} " + " ".join(f"{by.get(s, float('nan')):7.3f}" for s in splits))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.score", description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run folder of trainer.train or trainer.finetune")
    p.add_argument("--splits", default=",".join(SPLITS), help="comma separated, of train, valid, test")
    p.add_argument("--weights", default="best", choices=("best", "last"))
    p.add_argument("--json", default=None, help="also write {split: summary} here")
    a = p.parse_args(argv)
    splits = tuple(s for s in a.splits.split(",") if s)
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        print(f"error: --splits {a.splits!r}: give some of {', '.join(SPLITS)}", file=sys.stderr)
        return 2
    try:
        res = score(a.run, splits, a.weights)
    except (ValueError, FileNotFoundError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(res))
    if a.json:
        write_atomic(a.json, json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
