"""How many trial-steps ASHA needs to find a mixture within one SEM of the grid's best, against the grid itself:
Ray Tune's ``ASHAScheduler`` with ``trainer.tune``'s settings, replayed on the validation curves of bench/gains.py's
finished grid.

    python bench/search_cost.py --work W       # after bench/gains.py with the same --work (its runs are read)

Why a replay: ASHA decides from nothing but the scores trials report at each validation and the order in which
they reach a rung. bench/gains.py ran every point of the grid to its end, so a function trainable that reports a
finished run's recorded pretraining validation scores (``val_score``, what ``trainer.tune --search asha`` reports,
one per validation; both the overall score it reported until now and the OPhys score it reports now,
``trainer.tune.trial.judged_validation``) through the real scheduler stops exactly the trials ASHA would have stopped, in seconds instead
of hours. The rungs are asynchronous (a trial is compared with those that reached the rung before it), so the
trials start in ``--orders`` shuffled orders, ``--concurrent`` at a time, each validation a short sleep apart so
concurrent trials advance together as they would.

Per corpus (``benchmark``: bench/gains.py's mixture grid, OPhys only at ratio 0; ``control``: its control grid,
whose ratio 0 is the same OPhys-only runs since both corpora's OPhys are byte for byte the same) and ordering:

- **trial-steps**: the pretraining steps each trial ran before it was stopped (the step of its last validation),
  plus, for a trial that finished, its pretraining's and finetuning's full steps; the grid pays every trial in full;
- **found**: the ratio ASHA's finished trials pick (best mean finetuned OPhys *valid* score over their seeds, the
  criterion bench/gains.py picks its best ratio by) scores within one SEM of the grid's best ratio on that same
  criterion (mean and SEM over the grid's seeds).

The Bayesian search (``--search bayes``, Optuna over per-region weights) proposes mixtures the grid never ran, so
it cannot be replayed from these runs: bench/search_bayes.py runs it live. Writes bench/results/search_cost.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gains import suffix  # noqa: E402  (the run folders bench/gains.py names)
from trainer.tune.report import mean_sem  # noqa: E402
from trainer.tune.spec import ExperimentSpec  # noqa: E402  (trainer.tune's ASHA settings)
from trainer.tune.trial import judged_validation, parse_validations  # noqa: E402  (what a trial reports)

METRICS = ("score", "ophys")  # val_score as trainer.tune reported it until now, and as it reports it now


def curves(run: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, val_score)]} of a pretraining's validations, from one read of its ``train.log`` (a resumed
    run's repeats: the last); "score": the overall validation score, "ophys": ``trainer.tune.trial.judged_validation``'s."""
    by_step: dict[str, dict[int, float]] = {m: {} for m in METRICS}
    for _, step, score, per in parse_validations((run / "train.log").read_text()):
        for m in METRICS:
            by_step[m][step] = score if m == "score" else judged_validation(score, per, m)
    if not by_step["score"]:
        raise SystemExit(f"error: {run / 'train.log'}: no validation lines (not a finished trainer.train run)")
    return {m: sorted(v.items()) for m, v in by_step.items()}


def finetune_record(run: Path) -> tuple[float, int]:
    """(the finetuned model's best OPhys valid score, its total steps) from ``metrics.json``."""
    path = run / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"error: {path}: no such file (run bench/gains.py with this --work first)")
    m = json.loads(path.read_text())
    return float(m["best"]["modality"].get("ophys", {}).get("score", math.nan)), int(m["total_steps"])


def grid_trials(work: Path, corpus: str, ratios: list[float], seeds: list[int]) -> list[dict]:
    """Every (ratio, seed) of one corpus's grid: its pretraining curve and steps, its finetuning's score and steps."""
    out = []
    for seed in seeds:
        base = work / f"seed{seed}"
        for r in ratios:
            if r == 0:
                pre, ft = base / "pretrain_ophys", base / "ophys_only"
            else:
                folder = base if corpus == "benchmark" else work / "control" / f"seed{seed}"
                pre, ft = folder / f"pretrain{suffix(r)}", folder / f"pretrained{suffix(r)}"
            c = curves(pre)
            score, ft_steps = finetune_record(ft)
            out.append({"id": f"{corpus}-r{r:g}-s{seed}", "ratio": r, "seed": seed, "curves": c,
                        "pretrain_steps": c["score"][-1][0], "finetune_steps": ft_steps, "score": score})
    return out


def grid_summary(trials: list[dict]) -> dict:
    """{ratio: (mean, SEM)} of the finetuned OPhys valid score over seeds, the best ratio, and the ratios within one SEM."""
    by = {r: mean_sem([t["score"] for t in trials if t["ratio"] == r]) for r in sorted({t["ratio"] for t in trials})}
    best = max(by, key=lambda r: by[r][0])
    floor = by[best][0] - by[best][1]
    return {"score": {f"{r:g}": v for r, v in by.items()}, "best": best,
            "within_one_sem": [r for r, v in by.items() if v[0] >= floor],
            "trial_steps": sum(t["pretrain_steps"] + t["finetune_steps"] for t in trials)}


def replay(trials: list[dict], metric: str, order_seed: int, concurrent: int, spec: ExperimentSpec,
           tick: float) -> dict:
    """One ASHA sweep over ``trials`` on ``metric``'s curves (trial order shuffled by ``order_seed``): per trial,
    the validations it ran."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    curves = {t["id"]: t["curves"][metric] for t in trials}

    def trainable(config: dict) -> None:
        for i, (step, score) in enumerate(curves[config["trial"]], start=1):
            time.sleep(tick)
            tune.report({"val_score": score, "validations": i, "step": step})

    order = [trials[i]["id"] for i in np.random.default_rng(order_seed).permutation(len(trials))]
    scheduler = ASHAScheduler(time_attr="validations", metric="val_score", mode="max", max_t=10**6,
                              grace_period=spec.asha_grace, reduction_factor=spec.asha_reduction)
    with tempfile.TemporaryDirectory() as tmp:
        tuner = tune.Tuner(tune.with_resources(trainable, {"CPU": 0.01}),
                           param_space={"trial": tune.grid_search(order)},
                           tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=concurrent),
                           run_config=tune.RunConfig(storage_path=tmp, name="replay", verbose=0))
        grid = tuner.fit()
        ran = {r.config["trial"]: int((r.metrics or {}).get("validations", 0)) for r in grid}
    return ran


def asha_outcome(trials: list[dict], ran: dict[str, int], grid: dict) -> dict:
    """Trial-steps paid, the ratio picked from the finished trials, and whether it is within one SEM of the grid's best."""
    steps, finished = 0, []
    for t in trials:
        k, c = ran[t["id"]], t["curves"]["score"]
        if k >= len(c):
            steps += t["pretrain_steps"] + t["finetune_steps"]
            finished.append(t)
        else:
            steps += c[k - 1][0] if k else 0
    by = {r: float(np.mean([t["score"] for t in finished if t["ratio"] == r])) for r in {t["ratio"] for t in finished}}
    picked = max(by, key=by.get) if by else None
    return {"trial_steps": steps, "finished": sorted(t["id"] for t in finished), "picked": picked,
            "found": picked in grid["within_one_sem"]}


def main() -> None:
    from shards.atomic import write_atomic

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="bench/gains.py's --work (holds cpu/seedN and cpu/control/seedN)")
    p.add_argument("--config", default="cpu", help="the configuration's folder under --work (default cpu)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ratios", default="0,0.5", help="the benchmark grid's EPhys shares (0: OPhys only)")
    p.add_argument("--control-ratios", default="0,0.25,0.5,0.75", help="the control grid's EPhys shares")
    p.add_argument("--orders", type=int, default=5, help="shuffled trial orders replayed per corpus")
    p.add_argument("--concurrent", type=int, default=2, help="trials at once (trainer.tune --concurrent)")
    p.add_argument("--grace", type=int, default=None, help="validations before ASHA may stop a trial (default: "
                   "trainer.tune's asha_grace)")
    p.add_argument("--tick", type=float, default=0.05, help="seconds between a replayed trial's validations")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "search_cost.json"))
    a = p.parse_args()
    import ray

    work = Path(a.work) / a.config
    seeds = [int(s) for s in a.seeds.split(",") if s]
    spec = ExperimentSpec() if a.grace is None else ExperimentSpec(asha_grace=a.grace)
    ray.init(address="local", num_cpus=2, object_store_memory=100 * 2**20, log_to_driver=False, logging_level="ERROR",
             include_dashboard=False)
    t0 = time.time()
    result: dict = {"asha": {"grace": spec.asha_grace, "reduction": spec.asha_reduction, "time_attr": "validations",
                             "metrics": {"score": "the pretraining's overall validation score (trainer.tune until now)",
                                         "ophys": "its OPhys validation score (trainer.tune's val_score now)"}},
                    "orders": a.orders, "concurrent": a.concurrent, "seeds": seeds, "corpora": {}}
    lines = [f"{'corpus':10} {'ASHA on':8} {'grid best':>9} {'within 1 SEM':>12} {'grid trial-steps':>16} "
             f"{'ASHA trial-steps':>16} {'ASHA / grid':>11} {'found':>7}"]
    for corpus, text in (("benchmark", a.ratios), ("control", a.control_ratios)):
        ratios = [float(r) for r in text.split(",") if r]
        trials = grid_trials(work, corpus, ratios, seeds)
        grid = grid_summary(trials)
        result["corpora"][corpus] = {"ratios": ratios, "grid": grid, "asha": {}}
        for metric in METRICS:
            outcomes = [asha_outcome(trials, replay(trials, metric, o, a.concurrent, spec, a.tick), grid)
                        for o in range(a.orders)]
            steps = float(np.mean([o["trial_steps"] for o in outcomes]))
            found = sum(o["found"] for o in outcomes)
            result["corpora"][corpus]["asha"][metric] = {
                "orderings": outcomes, "trial_steps_mean": steps, "over_grid": steps / grid["trial_steps"],
                "found_fraction": found / len(outcomes)}
            lines.append(f"{corpus:10} {metric:8} {grid['best']:9g} {','.join(f'{r:g}' for r in grid['within_one_sem']):>12} "
                         f"{grid['trial_steps']:16,d} {steps:16,.0f} {steps / grid['trial_steps']:11.2f} "
                         f"{found:>3}/{len(outcomes)}")
    print("\n".join(lines))
    result["wall_s"] = round(time.time() - t0, 1)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out, json.dumps(result, indent=1))
    print(f"wall {result['wall_s']:.0f} s -> {a.out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
