"""One evaluation pass: the model, in eval mode and without DDP, over an evaluation loader, tallied per
presentation and summed over ranks. What is tallied and how the headline is scored (per-presentation
logit averaging, accuracy per record, the mean over records; the pooled figures; the merge across
ranks) is ``trainer.tally``."""

from __future__ import annotations

import torch

from trainer.tally import Tally


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, *, session_ids: list[str], device, to_model=lambda b: b,
             max_batches: int | None = None, record_ids: list[tuple[str, str]] | None = None) -> Tally:
    """Run the model (in eval mode, no DDP) over one pass of an evaluation loader; sum over ranks, with the
    per-presentation sums of the headline merged across them. Every rank runs the same number of batches
    (the evaluation plan is padded to whole steps)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    tally = Tally(net.config.tasks, session_ids, record_ids=record_ids, confusion=True, per_presentation=True,
                  device=device)
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        tally.add(net(to_model(batch)), batch)
    net.train(was_training)
    return tally.all_reduce()
