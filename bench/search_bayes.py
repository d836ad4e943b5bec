"""How many trial-steps ``trainer.tune --search bayes`` needs to propose a mixture within one SEM of the grid's best,
on the synthetic benchmark: live trials, each a pretraining on the per-region weights Optuna's TPE proposes and the
benchmark's finetuning, against bench/gains.py's grid (bench/results/search_cost.json).

    python bench/search_bayes.py --work W [--samples 4] [--startup 2] [--seed 0] [--jobs 2]
    python bench/search_bayes.py --work W --samples 4 --train-seeds 0,1 --out bench/results/search_bayes_2seeds.json

Why live, when bench/search_cost.py replays ASHA in seconds: the searcher proposes weights the grid never ran, so
every trial is a fresh pretraining and finetuning (~17 min alone on 2 cores). The searcher is ``trainer.tune``'s
own (``trainer.tune.sweep.bayes_searcher``: TPE, ``--startup`` random trials first, one weight in [0, 1] per
(modality, region) of the pretraining sessions, normalised into the mixture by ``trainer.tune.trial.point_of``);
the trial is bench/gains.py's arm (bench/science.py's CPU command lines, ``--mix`` the proposed weights, every
pretraining's epoch 8,192 windows so it validates as often as the grid's), scored as the grid picks its best ratio:
the finetuned model's best OPhys *valid* score on the held-out plane. Every trial trains with the same ``--seed``,
or with each of ``--train-seeds`` and is scored by their mean: one seed's score spreads by about as much as the
mixtures differ (bench/results/search_bayes.json: six proposals within 0.03, one mixture's SEM over seeds 0.014),
so a searcher that models one-seed scores models mostly noise.

- **trial-steps**: each trial's pretraining steps plus its finetuning's, summed in the order trials finished;
- **found**: the first trial whose score is at least the grid's best mean minus its SEM (the grid's best is a mean
  over 3 training seeds, a trial one seed: the grid's own trial at the same seed is printed beside it).

Writes bench/results/search_bayes.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gains import SINGLE_REGION_EPOCH  # noqa: E402  (the arm's epoch)
from bench.science import CONFIGS, BenchConfig, build_corpus, finetune, held_out_sessions, pretrain  # noqa: E402
from bench.search_cost import finetune_record  # noqa: E402
from trainer.tune.spec import ExperimentSpec  # noqa: E402
from trainer.tune.sweep import bayes_searcher, bayes_selectors, startup_trials, weight_space  # noqa: E402
from trainer.tune.trial import point_of  # noqa: E402  (weights -> mixture, as a sweep's trial does)


def selectors(store: Path, held: list[str]) -> list[str]:
    """``modality/region`` of every pretraining session's records (what a weight can be put on)."""
    from trainer.tune.heldout import session_table

    t = session_table(str(store))
    return bayes_selectors(t[~t.session_id.isin(held)])


def run_trial(config: dict, work: Path, store: Path, held: list[str], seeds: list[int], cfg: BenchConfig) -> dict:
    """One proposed mixture: pretrain on it, finetune on the held-out sessions, once per training seed; its score
    (the mean over seeds), test accuracies (the same), trial-steps (summed over seeds) and its run folders under
    ``WORK/bayes`` (``runs``, one per training seed)."""
    scores, tests, steps, runs = [], [], 0, []
    for seed in seeds:
        point = point_of({**config, "seed": seed}, ExperimentSpec(seeds=[seed]))
        run = work / "bayes" / point.key
        runs.append(point.key)
        pre = pretrain(run, "pretrain", store, held, cfg, seed, mix=point.mix(), extra=SINGLE_REGION_EPOCH)
        tests.append(finetune(run, "finetuned", pre, store, held, cfg, seed).get("ophys", {}))
        score, ft_steps = finetune_record(run / "finetuned")  # the OPhys valid score the grid picks its best ratio by
        scores.append(score)
        steps += int(json.loads((pre / "metrics.json").read_text())["total_steps"]) + ft_steps
    return {"runs": runs, "weights": point.weights, "ratio": point.ratio, "mix": point.mix(),
            "score": float(np.mean(scores)), "score_per_seed": scores, "seeds": seeds,
            "test": {t: float(np.mean([x.get(t, np.nan) for x in tests])) for t in tests[0]},
            "trial_steps": steps}


def search(work: Path, store: Path, held: list[str], names: list[str], cfg: BenchConfig, seed: int, samples: int,
           startup: int, jobs: int, train_seeds: list[int]) -> list[dict]:
    """The trials in the order they finished."""
    import ray
    from ray import tune

    def trainable(config: dict) -> None:
        t = run_trial(config, work, store, held, train_seeds, cfg)
        tune.report({"score": t["score"], "trial": json.dumps(t), "finished_at": time.time()})

    space = weight_space(names) | {"seed": seed}
    ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, log_to_driver=False,
             logging_level="ERROR", include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tuner = tune.Tuner(tune.with_resources(trainable, {"CPU": 0.01}), param_space=space,
                               tune_config=tune.TuneConfig(search_alg=bayes_searcher(samples, startup, seed),
                                                           num_samples=samples, max_concurrent_trials=jobs),
                               run_config=tune.RunConfig(storage_path=tmp, name="bayes", verbose=0))
            results = tuner.fit()
            done = [r.metrics for r in results if r.metrics and "trial" in r.metrics]
            errors = [str(r.error).splitlines()[0] for r in results if r.error]
    finally:
        ray.shutdown()
    if errors:
        raise SystemExit(f"error: {len(errors)} trial(s) failed: {errors[0]}")
    return [json.loads(m["trial"]) for m in sorted(done, key=lambda m: m["finished_at"])]


def main() -> None:
    from shards.atomic import write_atomic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="bench/science.py's --work (its cpu/store is built when missing)")
    p.add_argument("--config", default="cpu", choices=sorted(CONFIGS), help="bench/science.py's configuration")
    p.add_argument("--samples", type=int, default=4, help="trials the searcher proposes")
    p.add_argument("--startup", type=int, default=0, help="random trials before TPE (0: trainer.tune's default)")
    p.add_argument("--seed", type=int, default=0, help="the training seed of every trial, and the searcher's")
    p.add_argument("--train-seeds", default=None, help="training seeds of every trial, comma separated; its score is "
                   "their mean (default: --seed alone)")
    p.add_argument("--jobs", type=int, default=2, help="trials at once")
    p.add_argument("--grid", default=str(REPO / "bench" / "results" / "search_cost.json"),
                   help="bench/search_cost.py's result: the grid's scores (mean, SEM) per ratio")
    p.add_argument("--gains", default=str(REPO / "bench" / "results" / "gains.json"),
                   help="bench/gains.py's result: the grid's trials at --seed")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "search_bayes.json"))
    a = p.parse_args()
    try:
        train_seeds = [int(x) for x in (a.train_seeds or str(a.seed)).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: --train-seeds {a.train_seeds!r}: give integers, comma separated") from None
    if not train_seeds or len(set(train_seeds)) != len(train_seeds):
        raise SystemExit(f"error: --train-seeds {a.train_seeds!r}: give at least one seed, each once")
    for path in (a.grid, a.gains):
        if not Path(path).is_file():
            raise SystemExit(f"error: {path}: no such file (run bench/search_cost.py and bench/gains.py first)")
    grid = json.loads(Path(a.grid).read_text())["corpora"]["benchmark"]["grid"]
    best_mean, best_sem = grid["score"][f"{grid['best']:g}"]
    floor = best_mean - best_sem
    per_seed = json.loads(Path(a.gains).read_text())["per_seed"]
    missing = [s for s in train_seeds if str(s) not in per_seed]
    if missing:
        raise SystemExit(f"error: {a.gains}: no grid trials at seed {missing[0]}")
    seed_grid = {arm: float(np.mean([per_seed[str(s)][arm]["valid"] for s in train_seeds]))
                 for arm in ("ophys_only", "mixture@0.5")}
    cfg = CONFIGS[a.config]
    t0 = time.time()
    work = Path(a.work) / a.config
    store = build_corpus(work, cfg)[1]
    held_by = held_out_sessions(store, cfg.held_out, cfg.corpus_seed)
    held = [s for mod in ("ephys", "ophys") for s in held_by[mod]]
    names = selectors(store, held)
    trials = search(work, store, held, names, cfg, a.seed, a.samples, a.startup, a.jobs, train_seeds)
    spent, found_at, steps_to_found = 0, None, None
    lines = [f"{'#':>2} {'EPhys share':>11} {'mix':60} {'OPhys valid':>11} {'trial-steps':>11} {'cumulative':>10}"]
    for i, t in enumerate(trials, start=1):
        spent += t["trial_steps"]
        if found_at is None and t["score"] >= floor:
            found_at, steps_to_found = i, spent
        lines.append(f"{i:2d} {t['ratio']:11.3f} {t['mix'][:60]:60} {t['score']:11.3f} {t['trial_steps']:11,d} "
                     f"{spent:10,d}")
    result = {
        "config": a.config, "searcher": {"kind": "optuna TPE (trainer.tune --search bayes)", "samples": a.samples,
                     "startup": startup_trials(a.samples, a.startup), "seed": a.seed, "concurrent": a.jobs,
                     "train_seeds": train_seeds,
                     "space": names},
        "grid": {"best_ratio": grid["best"], "best_mean": best_mean, "best_sem": best_sem, "floor": floor,
                 "trial_steps": grid["trial_steps"], "at_seed": seed_grid},
        "trials": trials, "found_at_trial": found_at, "trial_steps_to_found": steps_to_found,
        "over_grid": steps_to_found / grid["trial_steps"] if steps_to_found else None,
        "best_trial_score": max((t["score"] for t in trials), default=None),
        "wall_s": round(time.time() - t0, 1),
    }
    print("\n".join(lines))
    print(f"grid: best ratio {grid['best']:g} at {best_mean:.3f} +- {best_sem:.3f} (3 seeds; floor {floor:.3f}); "
          f"at seeds {train_seeds}: " + ", ".join(f"{k} {v:.3f}" for k, v in seed_grid.items()))
    print(f"found at trial {found_at} after {steps_to_found or spent:,d} trial-steps "
          f"(grid: {grid['trial_steps']:,d})" if found_at else f"not found in {len(trials)} trials ({spent:,d} trial-steps)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out, json.dumps(result, indent=1))
    print(f"wall {result['wall_s']:.0f} s -> {a.out}")


if __name__ == "__main__":
    main()
