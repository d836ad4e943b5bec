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

Each reports test-split accuracy per task (and per record) in ``RUN2/metrics.json`` and on screen: the
papers' figure (one prediction per presentation from the overlapping test windows, accuracy per
(session, region) record, mean over records; ``trainer.evaluate``), with the per-query figure under ``pooled``.
Every other setting comes from the pretrained run's ``config.yaml`` (model variant and size, batch,
learning rate, workers), then from the flags given here. The training itself is ``trainer.train``'s:
same loop, checkpoints, TensorBoard, ``--resume``.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from trainer.config import TrainConfig, build_parser, load_yaml, resolve

FINETUNE_DEFAULTS = dict(epochs=50, unfreeze_epoch=25, test_at_end=True, early_stop_patience=0, max_steps=None,
                         epoch_windows=None, sessions_exclude=[], resume=False, fail_at_step=None, stop_at_step=None,
                         record_batches=False, save_epoch_models=False)


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


def session_modalities(store: str, sessions: list[str]) -> dict[str, str]:
    from shards import manifest
    from shards.store import Store

    table = manifest.load(Store(store)).sessions.to_pandas()
    mods = dict(zip(table.session_id, table.modality))
    missing = [s for s in sessions if s not in mods]
    if missing:
        raise ValueError(f"session(s) {missing} not in {store}/sessions.parquet")
    return {s: mods[s] for s in sessions}


def finetune_config(source: str, shards: str, sessions: list[str], out: str, mode: str) -> TrainConfig:
    """The TrainConfig of a finetune run: the pretrained run's config < finetune defaults (flags go on top)."""
    model_path = pretrained_file(source)
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.yaml")
    base = load_yaml(cfg_path)[0] if os.path.exists(cfg_path) else TrainConfig()
    if not sessions:
        raise ValueError("--sessions is required (comma separated session ids)")
    mods = sorted(set(session_modalities(shards, sessions).values()))
    base = dataclasses.replace(base, **FINETUNE_DEFAULTS, shards=shards, out=out, sessions_include=list(sessions),
                               mix=",".join(f"{m}=1" for m in mods),
                               init_from=model_path if mode == "pretrained" else None)
    if mode == "scratch":
        base = dataclasses.replace(base, unfreeze_epoch=0)
    return base


# ---- the pretrained model with grown vocabularies (called by trainer.loop.build_model) ------------------

def load_pretrained(cfg: TrainConfig, vocab, sessions_here: list[str]):
    """The model in ``cfg.init_from`` with new unit and session rows for this run's sessions that it never
    trained on; returns (model, meta, unit_map, session_map), the maps taking the store's indices
    to model rows."""
    from trainer.checkpoint import load_model_file, make_meta
    from trainer.model.config import ModelConfig
    from trainer.model.network import MultiModalPOYO

    ck = load_model_file(cfg.init_from)
    meta = ck["meta"]
    model = MultiModalPOYO(config=ModelConfig.from_dict(ck["config"]).replace(amp=cfg.bf16), n_units=ck["n_units"],
                           n_sessions=ck["n_sessions"])
    model.load_state_dict(ck["state_dict"])

    seen = set(meta["trained_sessions"])  # sessions whose embeddings the pretraining trained
    session_row = {s: i for i, s in enumerate(meta["session_ids"]) if s in seen}
    unit_row = {u: i for i, u in enumerate(meta["unit_ids"]) if session_of(u, seen) is not None}
    here = set(sessions_here)
    new_sessions = [s for s in sorted(here) if s not in session_row]
    new_units = [u for u in sorted(vocab.units, key=vocab.units.get)
                 if u not in unit_row and session_of(u, here) is not None]
    unit_new, session_new = model.grow_vocab(n_units=len(new_units), n_sessions=len(new_sessions))
    unit_row.update(zip(new_units, unit_new.tolist()))
    session_row.update(zip(new_sessions, session_new.tolist()))

    unit_map = torch.zeros(max(1, len(vocab.units)), dtype=torch.int64)
    for u, i in vocab.units.items():
        unit_map[i] = unit_row.get(u, 0)
    session_map = torch.zeros(max(1, len(vocab.sessions)), dtype=torch.int64)
    for s, i in vocab.sessions.items():
        session_map[i] = session_row.get(s, 0)
    meta_out = make_meta(variant=meta["variant"], model_config=ModelConfig.from_dict(meta["model_config"]),
                         unit_ids=list(meta["unit_ids"]) + new_units, session_ids=list(meta["session_ids"]) + new_sessions,
                         trained_sessions=sorted(seen | here), finetuned_from=cfg.init_from,
                         new_units=len(new_units), new_sessions=new_sessions)
    return model, meta_out, unit_map, session_map


def session_of(unit_id: str, sessions: set[str]) -> str | None:
    """The session of a unit id ``"{session_id}/{local_id}"`` among ``sessions`` (ids may contain '/')."""
    parts = unit_id.split("/")
    for k in range(1, len(parts)):
        s = "/".join(parts[:k])
        if s in sessions:
            return s
    return None


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
        if mode == "pretrained" and requested is not None:
            from trainer.checkpoint import load_model_file

            theirs = load_model_file(cfg.init_from)["meta"]["variant"]
            if theirs != requested:
                raise ValueError(f"--from {source} holds a {theirs!r} model, but --model asks for {requested!r}")
        if mode == "mlp":
            from trainer.baselines import run_mlp_baseline

            metrics = run_mlp_baseline(cfg)
        else:
            from trainer.train import run

            metrics = run(cfg)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print_test(metrics, mode, cfg.absolute().out)
    return metrics


def print_test(metrics: dict, mode: str, out: str) -> None:
    from trainer.train import accuracy_table

    test = metrics.get("test") or {}
    pooled = (test.get("pooled") or {}).get("score", float("nan"))
    print(f"\n{mode}: test-split accuracy per task, one prediction per presentation, mean over records "
          f"(score {test.get('score', float('nan')):.3f}; pooled per query {pooled:.3f})")
    print("\n".join(accuracy_table(test)))
    for name, e in test.get("record", {}).items():
        accs = ", ".join(f"{t} {v.get('acc', v.get('r2', float('nan'))):.3f} (n={int(v['n'])})"
                         for t, v in e["tasks"].items())
        print(f"  record {name} ({e['modality']}): {accs}")
    print(f"metrics: {os.path.join(out, 'metrics.json')}")


if __name__ == "__main__":
    main()
