"""Can the model fit a few fixed batches? A probe of the gradient path, not of learning.

    python bench/overfit.py --store STORE --mix ophys=1 [--batches 4] [--steps 300] [--set calcium_gain=true]

Takes the first ``--batches`` batches of the training stream, trains the small preset on them in turn
(the small preset's optimizer at its rate: AdamW 5e-4 at batch 32) and prints the training loss and the accuracy (all tasks pooled) on
those same batches every 50 steps. A model that cannot drive this loss down has a broken path from its inputs
to its loss; one that can, but stays at chance on held-out windows, memorises instead of learning
(docs/model.md, section 4). Prints a table and writes JSON (``--out``) like the other benchmarks;
there is no anchor: the figure of merit is the loss itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.stream.dataset import MixtureStream  # noqa: E402
from trainer.build import build_model, make_optimizer  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.model.network import MultiModalPOYO  # noqa: E402


def accuracy(model: MultiModalPOYO, batches: list[dict]) -> float:
    """Accuracy over every labelled query of the fixed batches, all tasks pooled."""
    hits, n = 0, 0
    with torch.no_grad():
        for b in batches:
            out = model(b)
            for task, rows in out["query_index"].items():
                labels = b["output_labels"][rows]
                keep = labels >= 0
                hits += int((out["logits"][task].argmax(-1)[keep] == labels[keep]).sum())
                n += int(keep.sum())
    return hits / max(n, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True)
    p.add_argument("--mix", default="ophys=1")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="default: the small preset's AdamW rate at this batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sessions-exclude", default="")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=JSON", help="a ModelConfig field")
    p.add_argument("--out", default=None, help="JSON file for the curve")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in a.set)}
    # the run's own config: its stream (calcium lag included), its fresh model and its optimizer
    cfg = TrainConfig(shards=a.store, mix=a.mix, batch_size=a.batch_size, seed=a.seed, preset="small",
                      model_overrides=overrides, lr=a.lr,
                      sessions_exclude=[s for s in a.sessions_exclude.split(",") if s])
    stream = MixtureStream(cfg.stream_config("train"))
    it = iter(stream)
    batches = [{k: torch.as_tensor(v) for k, v in next(it).items()} for _ in range(a.batches)]
    model = build_model(cfg, stream).model
    opt = make_optimizer(cfg, model)
    curve, t0 = [], time.time()
    print(f"{'step':>5} {'loss':>7} {'accuracy (these batches)':>25} {'s':>5}")
    for step in range(a.steps + 1):
        loss = model(batches[step % len(batches)])["loss"]
        if step % 50 == 0:
            row = {"step": step, "loss": round(float(loss.detach()), 4), "accuracy": round(accuracy(model, batches), 3),
                   "wall_s": round(time.time() - t0, 1)}
            curve.append(row)
            print(f"{step:>5} {row['loss']:>7.3f} {row['accuracy']:>25.3f} {row['wall_s']:>5.0f}", flush=True)
        if step < a.steps:
            loss.backward()
            opt.step()
            opt.zero_grad()
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "lr": cfg.peak_lr, "model_overrides": overrides, "curve": curve,
                                           "final_loss": curve[-1]["loss"], "first_loss": curve[0]["loss"]},
                                          indent=1) + "\n")
    print(f"loss {curve[0]['loss']:.3f} -> {curve[-1]['loss']:.3f} over {a.steps} steps on {a.batches} fixed "
          f"batches (accuracy on them, all tasks pooled: {curve[0]['accuracy']:.3f} -> {curve[-1]['accuracy']:.3f})")


if __name__ == "__main__":
    main()
