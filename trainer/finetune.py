"""Finetuning on sessions the pretrained model never saw, with gradual unfreezing (papers' App. C).

    python -m trainer.finetune --from runs/pre --shards demo/store --sessions S1,S2 --out runs/ft
    python -m trainer.finetune --from runs/pre --shards demo/store --sessions S1,S2 --out runs/ft-scratch --mode scratch
    python -m trainer.finetune --from runs/pre --shards demo/store --sessions S1,S2 --out runs/ft-mlp --mode mlp

Modes (the comparison of the papers):
- ``pretrained`` (default): the pretrained model gets new unit and session embedding rows for the
  sessions it never trained on; it trains on their train split with only the unit and session
  embeddings free until ``--unfreeze-epoch`` (25 of 50 epochs in the paper), then everything.
- ``scratch``: the same model, freshly initialised, trained on those sessions only (nothing frozen).
- ``mlp``: one small MLP per session on binned activity (``trainer.baselines``).

The pretrained and scratch modes draw their windows with each modality weighted by its records
(``trainer.sessions.finetune_mix``: a Neuropixels session is a record per region, a plane one), so every
record gets the same share, as in the headline metric; ``--mix`` overrides it.

Each reports test-split accuracy per task (and per record) in ``RUN2/metrics.json`` and on screen: the
papers' figure (one prediction per presentation from the overlapping test windows, accuracy per
(session, region) record, mean over records; ``trainer.tally``), with the per-query figure under ``pooled``.
Every other setting comes from the pretrained run's ``config.yaml`` (model variant and size, batch,
learning rate, workers), then from the flags given here. The training itself is ``trainer.train``'s:
same loop, checkpoints, TensorBoard, ``--resume``.
"""

from __future__ import annotations

import dataclasses
import os

from trainer.baselines import run_mlp_baseline
from trainer.checkpoint import load_model_file
from trainer.config import TrainConfig, build_parser, load_yaml, resolve
from trainer.report import print_test
from trainer.sessions import finetune_mix
from trainer.train import run
from trainer.unit_init import check_store

FINETUNE_DEFAULTS = dict(epochs=50, unfreeze_epoch=25, test_at_end=True, early_stop_patience=0, max_steps=None,
                         epoch_windows=None, sessions_exclude=[], resume=False, save_epoch_models=False)


def pretrained_file(source: str) -> str:
    """RUN folder -> its model_best.pt (else model_last.pt); a file stays itself."""
    if os.path.isdir(source):
        for name in ("model_best.pt", "model_last.pt"):
            if os.path.exists(os.path.join(source, name)):
                return os.path.join(source, name)
        raise FileNotFoundError(f"--from {source}: no model_best.pt or model_last.pt (is it a trainer.train run?)")
    if not os.path.exists(source):
        raise FileNotFoundError(f"--from {source}: no such run folder or model file")
    return source


def finetune_config(source: str, shards: str, sessions: list[str], out: str, mode: str) -> TrainConfig:
    """The TrainConfig of a finetune run: the pretrained run's config < finetune defaults (flags go on top). A
    model from scratch keeps the pretraining's ``unit_init`` (the same recipe on the held-out sessions); a pretrained
    one starts its new units at random unless told ``tuning`` (``pca`` is for a fresh model)."""
    model_path = pretrained_file(source)
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.yaml")
    base = load_yaml(cfg_path)[0] if os.path.exists(cfg_path) else TrainConfig()
    if not sessions:
        raise ValueError("--sessions is required (comma separated session ids)")
    base = dataclasses.replace(base, **FINETUNE_DEFAULTS, shards=shards, out=out, sessions_include=list(sessions),
                               mix=finetune_mix(shards, sessions),
                               init_from=model_path if mode == "pretrained" else None)
    if mode == "scratch":
        base = dataclasses.replace(base, unfreeze_epoch=0)
    elif base.unit_init == "pca":  # the pretraining's own rows came from PCA; a finetuning's new rows cannot
        base = dataclasses.replace(base, unit_init="random")
    return base


# ---- command line -------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    p = build_parser(prog="python -m trainer.finetune",
                     description="Finetune a pretrained run on new sessions (gradual unfreezing), or train the "
                                 "from-scratch / per-session MLP baselines. Settings default to the pretrained "
                                 "run's config.yaml, then: " + ", ".join(f"{k}={v}" for k, v in
                                                                         FINETUNE_DEFAULTS.items()
                                                                         if k in ("epochs", "unfreeze_epoch")),
                     skip=("init_from", "sessions_include"))
    p.add_argument("--from", dest="source", required=True, help="the pretrained run folder (or a model file)")
    p.add_argument("--sessions", required=True, help="comma separated session ids to finetune on")
    p.add_argument("--mode", choices=("pretrained", "scratch", "mlp"), default="pretrained",
                   help="pretrained model, same model from scratch, or per-session MLP (default: pretrained)")
    args = p.parse_args(argv)
    source, sessions, mode = args.source, [s.strip() for s in args.sessions.split(",") if s.strip()], args.mode
    del args.source, args.sessions, args.mode
    try:
        if not isinstance(args.shards, str) or not isinstance(args.out, str):
            raise ValueError("--shards and --out are required")
        cfg = finetune_config(source, args.shards, sessions, args.out, mode)
        requested = args.model if isinstance(args.model, str) else None
        cfg = resolve(args, cfg)
        if mode == "pretrained" and (requested is not None or cfg.unit_init == "tuning" or cfg.readout_fit):
            theirs = load_model_file(cfg.init_from)["meta"]  # read once for every check
            if requested is not None and theirs["variant"] != requested:
                raise ValueError(f"--from {source} holds a {theirs['variant']!r} model, but --model asks for "
                                 f"{requested!r}")
            if cfg.unit_init == "tuning":
                check_store(cfg.shards, theirs["trained_sessions"], sessions)
            if cfg.readout_fit and not theirs["model_config"].get("likelihood_readout"):
                raise ValueError(f"--readout-fit: --from {source} has no likelihood readout to fit (it was pretrained "
                                 "without --model-override likelihood_readout=true)")
        if mode == "mlp":
            metrics = run_mlp_baseline(cfg)
        else:
            metrics = run(cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print_test(metrics, mode, cfg.absolute().out)
    return metrics


if __name__ == "__main__":
    main()
