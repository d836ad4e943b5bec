"""The sweep's driver: check everything, then one Ray Tune experiment of function trainables.

``prepare`` does every check before any trial starts (the spec, the store's regions, the held-out
draw, every point's pretraining sessions) and writes ``SWEEP/heldout.json`` and ``SWEEP/sweep.json``.
``run_sweep`` builds the Tuner (grid, ``asha`` or ``bayes``), or restores the one in ``SWEEP/tune``
(``Tuner.restore``: the trials that finished are kept, the others run, with the same trial ids), then
writes results.parquet, the report and the hparams from the trials' last results.

Resources per trial: the trial itself asks for one ``train_driver`` resource (a cluster declares as many
as trials it runs at once: ``ray start --resources='{"train_driver":8}'``; a local cluster started here
gets ``--concurrent``, else 2), or 0.01 CPU on a cluster without it (Ray refuses a trial of zero
resources); its Ray Train workers ask for ``cpus_per_worker`` CPUs and, with ``gpus_per_worker``, a GPU
each. ``workers`` 0 means one Train worker: Ray Train's local mode cannot run inside a Tune trial (Ray
2.60 refuses ``ray.train.get_context`` in a Tune session), so every run is a TorchTrainer of >= 1 worker.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ray
import ray.tune
from ray.tune.schedulers import ASHAScheduler

from shards.store import Store, is_remote
from trainer.tune import results
from trainer.tune.heldout import choose_heldout, regions_of, session_table, write_heldout
from trainer.tune.points import Point, check_regions, grid_points, point_sessions
from trainer.tune.spec import ExperimentSpec
from trainer.tune.trial import trainable

TUNE_DIR = "tune"


@dataclass
class Resources:
    workers: int = 0
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0
    concurrent: int = 0  # 0: as many as the resources allow
    max_failures: int = 1  # retries of a failed trial (each from its last stage)

    def to_context(self) -> dict:
        return {"workers": max(1, self.workers), "cpus_per_worker": self.cpus_per_worker,
                "use_gpu": bool(self.gpus_per_worker)}


@dataclass
class Plan:
    spec: ExperimentSpec
    points: list[Point]
    context: dict
    sweep: Store
    storage_path: str


def prepare(spec: ExperimentSpec, shards: str, out: str, res: Resources, work: str | None = None,
            origins: dict[str, str] | None = None) -> Plan:
    """Every check before a trial starts; ValueError / FileNotFoundError (one line) on bad input."""
    if not shards:
        raise ValueError("--shards is required (a shard store from `python -m ingest run`)")
    if not out:
        raise ValueError("--out is required (the sweep folder, or s3://bucket/prefix)")
    shards = shards if is_remote(shards) else os.path.abspath(shards)
    if not is_remote(shards) and not os.path.isdir(shards):
        raise FileNotFoundError(f"--shards {shards}: no such store")
    table = session_table(shards)
    check_regions(spec, table, shards, origins or {})
    heldout = choose_heldout(table, spec.held_out, spec.heldout_seed, shards)
    points = grid_points(spec) if spec.search != "bayes" else []
    for p in points:
        point_sessions(p, table, heldout, spec.heldout_seed)  # raises when a modality has no session left
    remote = is_remote(out)
    storage_path = out if remote else os.path.abspath(out)
    work = os.path.abspath(work or (os.path.join(os.path.expanduser("~"), ".cache", "neuromix", "sweeps",
                                                 spec.name) if remote else storage_path))
    hooks = {"fail": [k for k in os.environ.get("NEUROMIX_TUNE_FAIL", "").split(",") if k]}
    context = {"spec": spec.to_dict(), "shards": shards, "work": work, "heldout": heldout,
               "resources": res.to_context(), "hooks": hooks,
               "bayes_selectors": bayes_selectors(table)}
    sweep = Store(storage_path)
    check_same_sweep(sweep, context, [p.key for p in points])
    write_heldout(sweep, heldout, spec.heldout_seed, spec.held_out)
    doc = {"spec": context["spec"], "shards": shards, "heldout": heldout, "points": [p.key for p in points]}
    sweep.write_bytes("sweep.json", (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())
    return Plan(spec, points, context, sweep, storage_path)


def check_same_sweep(sweep: Store, context: dict, keys: list[str]) -> None:
    """An --out that holds another sweep (other spec, store or held-out sessions) is refused."""
    if not sweep.exists("sweep.json"):
        return
    old = json.loads(sweep.read_bytes("sweep.json"))
    if isinstance(old.get("spec"), dict):  # a sweep written before a spec field existed ran at that field's default
        old["spec"] = {**{k: v for k, v in ExperimentSpec().to_dict().items() if k in context["spec"]}, **old["spec"]}
    new = {"spec": context["spec"], "shards": context["shards"], "heldout": context["heldout"], "points": keys}
    diff = [k for k in new if old.get(k) != new[k]]
    if diff:
        raise ValueError(f"{sweep.uri} holds another sweep (its {', '.join(diff)} differ{'s' if len(diff) == 1 else ''}"
                         f"): choose another --out, or rerun with the same experiment to restore it")


def trial_resources() -> dict:
    if ray.cluster_resources().get("train_driver", 0) >= 1:
        return {"CPU": 0, "train_driver": 1}
    return {"CPU": 0.01}


def bayes_selectors(table) -> list[str]:
    """``modality/region`` of every (modality, region) in ``table`` (session_table rows): what a weight can go on."""
    return [f"{m}/{r}" for m in ("ephys", "ophys") for r in regions_of(table, m)]


def weight_space(selectors: list[str]) -> dict:
    """One weight in [0, 1] per selector, keyed "w:ephys:VISp" (Tune flattens config keys on "/");
    ``trainer.tune.trial.point_of`` normalises them into the trial's mixture."""
    return {f"w:{sel.replace('/', ':')}": ray.tune.uniform(0.0, 1.0) for sel in selectors}


def param_space(plan: Plan) -> dict:
    if plan.spec.search == "bayes":
        return {**weight_space(plan.context["bayes_selectors"]), "seed": plan.spec.seeds[0]}
    return {"point": ray.tune.grid_search([p.to_dict() for p in plan.points])}


def startup_trials(samples: int, startup: int = 0) -> int:
    """Random trials before TPE models the rest: ``startup``, or (0) a quarter of ``samples``, at least 2."""
    return startup if startup > 0 else max(2, samples // 4)


def bayes_searcher(samples: int, startup: int, seed: int, metric: str = "score"):
    """Optuna's TPE with ``startup_trials`` random trials first. Optuna's own default is 10 random trials, more
    than ``--samples``' default of 8: with it, every sweep of up to 10 trials was a random search."""
    import optuna  # optuna is only needed by this search
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(samples, startup))
    return OptunaSearch(metric=metric, mode="max", sampler=sampler)


def tune_config(plan: Plan, res: Resources) -> ray.tune.TuneConfig:
    spec = plan.spec
    kw = {"max_concurrent_trials": res.concurrent or None}
    if spec.search == "bayes":
        return ray.tune.TuneConfig(search_alg=bayes_searcher(spec.samples, spec.bayes_startup, spec.heldout_seed),
                                   num_samples=spec.samples, **kw)
    if spec.search == "asha":
        scheduler = ASHAScheduler(time_attr="validations", metric="val_score", mode="max", max_t=10**6,
                                  grace_period=spec.asha_grace, reduction_factor=spec.asha_reduction)
        return ray.tune.TuneConfig(scheduler=scheduler, **kw)
    return ray.tune.TuneConfig(**kw)


def start_ray(res: Resources) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    kw = {"resources": {"train_driver": res.concurrent or 2}} if not os.environ.get("RAY_ADDRESS") else {}
    ray.init(address=os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False, logging_level="WARNING", **kw)


def run_sweep(plan: Plan, res: Resources, progress=print) -> dict:
    """Fit (or restore and finish) the sweep; write results, report and hparams; returns a summary."""
    start_ray(res)
    fn = ray.tune.with_resources(ray.tune.with_parameters(trainable, context=plan.context), trial_resources())
    path = f"{plan.storage_path.rstrip('/')}/{TUNE_DIR}"
    restored = ray.tune.Tuner.can_restore(path)
    if restored:
        progress(f"restoring the sweep in {path}: finished trials are kept, the others run")
        tuner = ray.tune.Tuner.restore(path, trainable=fn, resume_errored=True, param_space=param_space(plan))
    else:
        run_config = ray.tune.RunConfig(name=TUNE_DIR, storage_path=plan.storage_path, verbose=0,
                                        failure_config=ray.tune.FailureConfig(max_failures=res.max_failures))
        tuner = ray.tune.Tuner(fn, param_space=param_space(plan), tune_config=tune_config(plan, res),
                               run_config=run_config)
    grid = tuner.fit()
    rows, errors, stopped = [], [], []
    for r in grid:
        m = r.metrics or {}
        if m.get("rows"):
            rows += json.loads(m["rows"])
        elif r.error is not None:
            errors.append(f"{m.get('trial_id') or os.path.basename(str(r.path))}: {type(r.error).__name__}: "
                          f"{(str(r.error).strip().splitlines() or [''])[-1][:200]}")
        else:
            stopped.append(m.get("trial_id") or os.path.basename(str(r.path)))
    summary = {"trials": len(grid), "finished": len(grid) - len(errors) - len(stopped), "errors": errors,
               "stopped": stopped, "rows": len(rows), "restored": restored}
    if rows:
        results.write(plan.sweep, rows, plan.spec.name, plan.spec.version)
    return summary
