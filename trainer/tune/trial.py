"""One trial of a sweep, Ray Tune's function trainable: pretrain on the point's mixture, finetune on the
held-out sessions of each modality, report per-record test accuracy.

    stage 1  pretrain   trainer.train.run on the point's mix and sessions (held-out sessions excluded);
                        each validation's score of the modality the trial is scored on (OPhys when it
                        evaluates OPhys) goes to Tune as ``val_score`` (what ASHA compares)
    stage 2  finetune   per evaluated modality, trainer.finetune's config on that modality's held-out
                        sessions (gradual unfreezing), test split at the end (best weights)
    end                 one row per held-out record x task (``rows``, JSON) and the trial's ``score``:
                        the mean test accuracy over its OPhys records (EPhys when it evaluates no OPhys)

The trial works in ``WORK/trials/<point key>/`` (``pretrain/``, ``finetune_<modality>/``). After each
stage it reports a Tune checkpoint holding what later stages need (the pretrained model and configs,
the finetuning metrics); a retried or restored trial first copies its last checkpoint back, then skips
every stage whose output is there, and a pretraining run cut off mid-way resumes from its own newest
checkpoint (``--resume``). A modality the mixture has no weight on is not finetuned (the papers'
tables leave those cells empty).

Test-only fault injection, like ``trainer.testhooks``: the driver reads ``NEUROMIX_TUNE_FAIL`` (point
keys, comma separated) and passes it in the sweep context; such a trial raises once after its
pretraining stage (a marker file in its folder makes the retry pass).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import threading
import time

import ray.tune

from trainer.checkpoint import latest_checkpoint
from trainer.config import TrainConfig
from trainer.finetune import finetune_config
from trainer.train import run
from trainer.tune.heldout import heldout_ids, is_area, session_table
from trainer.tune.points import Point, point_sessions
from trainer.tune.spec import ExperimentSpec

VALIDATION = re.compile(r"validation after epoch (\d+) \(step (\d+)\): score (\S+)([^\n]*)")
MODALITY = re.compile(r"\b(ephys|ophys): ([^;(]*)")
KEPT = ("config.yaml", "metrics.json", "model_best.pt", "model_last.pt")  # what a checkpoint keeps of a run


class InjectedFailure(RuntimeError):
    """The test hook's failure (NEUROMIX_TUNE_FAIL)."""


def trial_dir(context: dict, point: Point) -> str:
    return os.path.join(context["work"], "trials", point.key)


def point_of(config: dict, spec: ExperimentSpec) -> Point:
    """The trial's point from its Tune config: a grid point, or a searcher's per-region weights."""
    if "point" in config:
        return Point.from_dict(config["point"])
    weights = {k[2:].replace(":", "/", 1): float(v) for k, v in config.items() if k.startswith("w:")}
    total = sum(weights.values()) or 1.0
    weights = {k: round(v / total, 6) for k, v in weights.items()}
    ratio = round(sum(w for k, w in weights.items() if k.startswith("ephys/")), 6)
    return Point(ratio=ratio, seed=int(config.get("seed", spec.seeds[0])), set_size=spec.set_sizes[0],
                 variant=spec.variants[0], weights=weights)


def pretrain_config(context: dict, spec: ExperimentSpec, point: Point, out: str, sessions: list[str]) -> TrainConfig:
    res = context["resources"]
    d = {**spec.train, "shards": context["shards"], "out": out, "mix": point.mix(), "sessions_include": sessions,
         "sessions_exclude": heldout_ids(context["heldout"]), "seed": point.seed, "model": point.variant,
         "preset": spec.preset, "model_overrides": dict(spec.model_overrides), "max_steps": spec.pretrain_steps,
         "workers": res["workers"], "cpus_per_worker": res["cpus_per_worker"], "use_gpu": res["use_gpu"]}
    d.setdefault("early_stop_patience", 0)  # a sweep compares fixed budgets
    return TrainConfig.from_dict(d, "sweep")


def finetune_run_config(context: dict, spec: ExperimentSpec, point: Point, pre: str, modality: str,
                        out: str) -> TrainConfig:
    res = context["resources"]
    base = finetune_config(pre, context["shards"], heldout_ids(context["heldout"], modality), out, "pretrained")
    extra = TrainConfig.from_dict(spec.finetune, "spec (finetune)")  # checked by spec.validate already
    return dataclasses.replace(base, **{k: getattr(extra, k) for k in spec.finetune},
                               epochs=spec.finetune_epochs, unfreeze_epoch=spec.unfreeze_epoch, seed=point.seed, workers=res["workers"], cpus_per_worker=res["cpus_per_worker"],
                               use_gpu=res["use_gpu"])


def finished(run_dir: str, key: str = "status") -> bool:
    """A run folder whose metrics.json says it finished (pretraining) or holds test metrics (finetuning)."""
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        m = json.load(fh)
    return m.get("status") in ("finished", "early_stopped") if key == "status" else bool(m.get(key))


def fresh_or_resume(cfg: TrainConfig) -> TrainConfig:
    """A run folder left by an earlier attempt: resume from its newest valid checkpoint, else start over."""
    if os.path.isdir(cfg.out) and os.listdir(cfg.out):
        if latest_checkpoint(cfg.out):
            return dataclasses.replace(cfg, resume=True)
        shutil.rmtree(cfg.out)
    return cfg


def train_reporting(cfg: TrainConfig, on_validation) -> dict:
    """trainer.train.run in a thread while this one calls ``on_validation(epoch, step, score, {modality: score})``
    for each validation the run's train.log gains (Tune's reports come from the trial's own thread)."""
    log = os.path.join(cfg.out, "train.log")
    seen = len(_validations(log))
    box: dict = {}

    def target() -> None:
        try:
            box["metrics"] = run(cfg)
        except BaseException as exc:  # noqa: B036 - handed to the trial's thread, which raises it
            box["error"] = exc

    thread = threading.Thread(target=target, name="pretrain", daemon=True)
    thread.start()
    while True:
        alive = thread.is_alive()
        found = _validations(log)
        for epoch, step, score, per in found[seen:]:
            on_validation(epoch, step, score, per)
        seen = len(found)
        if not alive:
            break
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return box["metrics"]


def _validations(log: str) -> list[tuple[int, int, float, dict[str, float]]]:
    if not os.path.exists(log):
        return []
    with open(log) as fh:
        return parse_validations(fh.read())


def parse_validations(text: str) -> list[tuple[int, int, float, dict[str, float]]]:
    """(epoch, step, score, {modality: its score}) of every validation line of a train.log; a modality's score is
    the mean of its tasks' accuracies on the line (the run's ``metrics.json`` score of that modality)."""
    out = []
    for m in VALIDATION.finditer(text):
        per = {}
        for mod in MODALITY.finditer(m.group(4)):
            accs = [float(part.strip().rsplit(" ", 1)[-1]) for part in mod.group(2).split(",") if part.strip()]
            per[mod.group(1)] = float(sum(accs) / len(accs)) if accs else math.nan
        out.append((int(m.group(1)), int(m.group(2)), float(m.group(3)), per))
    return out


def judged_modality(spec: ExperimentSpec) -> str:
    """The modality a trial's ``score`` is computed on (``trial_score``): OPhys when the trial evaluates it."""
    return "ophys" if "ophys" in spec.evaluate else "ephys"


def judged_validation(score: float, per_modality: dict[str, float], modality: str) -> float:
    """What ASHA compares: the pretraining's validation score of the judged modality, else its overall score.

    Why not the overall score: it averages EPhys and OPhys validation, so a sweep judged on held-out OPhys would
    rank its trials partly by EPhys accuracy, which favours EPhys-heavy mixtures whatever they do for OPhys.
    Replayed on bench/gains.py's grids (bench/search_cost.py, 5 trial orders) the two are level: within one SEM
    of the grid's best in 4/5 (OPhys) and 5/5 (overall) orders on the benchmark corpus and 1/5 each on the
    control corpus, at 0.25-0.36 of the grid's trial-steps; a pretraining's OPhys validation sits at chance
    for its first ~8 validations, so early rungs compare noise either way (docs/sweeps.md)."""
    v = per_modality.get(modality, math.nan)
    return v if math.isfinite(v) else score


def test_rows(metrics: dict) -> list[dict]:
    """(session, region, modality, task, accuracy, n) per record and classification task of a test split."""
    rows = []
    for rec in (metrics.get("test") or {}).get("record", {}).values():
        for task, v in rec["tasks"].items():
            if "acc" in v:
                rows.append({"session": rec["session"], "region": rec["region"], "modality": rec["modality"],
                             "task": task, "accuracy": float(v["acc"]), "n": int(v.get("n", 0))})
    return sorted(rows, key=lambda r: (r["modality"], r["session"], r["region"], r["task"]))


def trial_score(rows: list[dict]) -> float:
    """Mean test accuracy over the OPhys rows (the papers' target), else over all rows; records of labels that
    name no brain area do not count (``trainer.tune.heldout.is_area``)."""
    rows = [r for r in rows if is_area(r["region"])]
    pick = [r["accuracy"] for r in rows if r["modality"] == "ophys"] or [r["accuracy"] for r in rows]
    return float(sum(pick) / len(pick)) if pick else math.nan


# ---- checkpoints -----------------------------------------------------------------------------------

def save_stage(tdir: str, stage_dirs: list[str], stage: str, metrics: dict) -> None:
    """Report ``metrics`` with a checkpoint of the stage folders' KEPT files."""
    staging = os.path.join(tdir, f".ckpt-{stage}-{time.time_ns()}")
    for name in stage_dirs:
        src = os.path.join(tdir, name)
        for f in KEPT:
            if os.path.exists(os.path.join(src, f)):
                os.makedirs(os.path.join(staging, name), exist_ok=True)
                shutil.copy2(os.path.join(src, f), os.path.join(staging, name, f))
    ray.tune.report(metrics, checkpoint=ray.tune.Checkpoint.from_directory(staging))
    shutil.rmtree(staging, ignore_errors=True)


def restore_stages(tdir: str) -> None:
    """Copy the trial's last Tune checkpoint back into its folder (where the files are missing)."""
    ckpt = ray.tune.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        for root, _, files in os.walk(d):
            rel = os.path.relpath(root, d)
            for f in files:
                dst = os.path.join(tdir, rel, f)
                if not os.path.exists(dst):
                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copy2(os.path.join(root, f), dst)


# ---- the trainable -----------------------------------------------------------------------------------

def trainable(config: dict, context: dict) -> None:
    """Ray Tune's function trainable (bound to the sweep's context with tune.with_parameters)."""
    spec = ExperimentSpec(**context["spec"])
    point = point_of(config, spec)
    tdir = trial_dir(context, point)
    os.makedirs(tdir, exist_ok=True)
    trial_id = ray.tune.get_context().get_trial_id()
    with open(os.path.join(tdir, "attempts.jsonl"), "a") as fh:  # one line per start: what restores count
        fh.write(json.dumps({"trial_id": trial_id, "time": time.time()}) + "\n")
    restore_stages(tdir)
    state = {"val_score": math.nan, "validations": 0, "score": math.nan, "stage": "pretrain"}

    def report(**more) -> None:
        state.update(more)
        ray.tune.report(dict(state))

    pre = os.path.join(tdir, "pretrain")
    judged = judged_modality(spec)
    if not finished(pre):
        sessions = point_sessions(point, session_table(context["shards"]), context["heldout"],
                                  spec.heldout_seed)
        cfg = fresh_or_resume(pretrain_config(context, spec, point, pre, sessions))
        train_reporting(cfg, lambda epoch, step, score, per: report(
            val_score=judged_validation(score, per, judged), validations=state["validations"] + 1, step=step))
    state["val_score"] = _best_val(pre, state["val_score"], judged)
    save_stage(tdir, ["pretrain"], "pretrain", {**state, "stage": "pretrained"})
    if point.key in context.get("hooks", {}).get("fail", []):
        marker = os.path.join(tdir, ".failed_once")
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise InjectedFailure(f"NEUROMIX_TUNE_FAIL: {point.key} fails once after pretraining")
    rows: list[dict] = []
    done = ["pretrain"]
    for mod in spec.evaluate:
        if point.side(mod) <= 0 or not heldout_ids(context["heldout"], mod):
            continue
        ft = os.path.join(tdir, f"finetune_{mod}")
        if not finished(ft, key="test"):
            if os.path.isdir(ft):
                shutil.rmtree(ft)  # a finetuning cut off mid-way is short: run it again whole
            run(finetune_run_config(context, spec, point, pre, mod, ft))
        with open(os.path.join(ft, "metrics.json")) as fh:
            rows += test_rows(json.load(fh))
        done.append(f"finetune_{mod}")
        save_stage(tdir, done, f"finetune_{mod}", {**state, "stage": f"finetuned_{mod}"})
    point_cols = {**point.to_dict(), "mix": point.mix(), "point": point.key, "trial_id": trial_id}
    point_cols.pop("weights")
    point_cols["weights"] = json.dumps(point.weights, sort_keys=True) if point.weights else ""
    rows = [{**point_cols, **r} for r in rows]
    report(score=trial_score(rows), stage="done", rows=json.dumps(rows), n_rows=len(rows))


def _best_val(run_dir: str, default: float, modality: str) -> float:
    """The finished pretraining's best validation, as ``judged_validation`` reads it."""
    path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(path):
        with open(path) as fh:
            best = json.load(fh).get("best") or {}
        if isinstance(best.get("score"), (int, float)):
            per = {m: float(e["score"]) for m, e in (best.get("modality") or {}).items()
                   if isinstance(e.get("score"), (int, float))}
            return judged_validation(float(best["score"]), per, modality)
    return default
