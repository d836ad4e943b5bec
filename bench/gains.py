"""The papers' mixture effect on the benchmark corpus, and its control: does EPhys in the pretraining
mixture help held-out OPhys sessions, and only when both modalities share what a stimulus means?

    python bench/gains.py                        # CPU configuration of bench/science.py, seeds 0,1,2
    python bench/gains.py --config smoke --seeds 0 --work /tmp/g   # minutes: checks the pipeline

Three arms, each pretrained for the same number of steps of the same batch size (the same number of
windows, the papers' "same data budget"), then finetuned with bench/science.py's protocol on the same
held-out sessions (gradual unfreezing), scored on their test split per record:

- ``mixture``    bench/science.py's pretraining (``ephys=1,ophys=1``: half the windows EPhys); its runs are
                 reused from the same ``--work`` when bench/science.py made them;
- ``ophys_only`` the same corpus, ``--mix ophys=1`` (every window OPhys);
- ``control``    the mixture on the control corpus (``ingest synth --ephys-code-seed``): its OPhys sessions
                 are byte for byte the benchmark's, its EPhys sessions have the same units and schedules
                 but an unrelated stimulus code, so EPhys can teach the trunk nothing about OPhys's classes.

``mixture_gain[task]`` is the OPhys test accuracy of the mixture minus OPhys-only (paired by seed, mean
over seeds; SEM beside it), ``control_gain`` the same for the control arm: the papers' Observation 2
predicts mixture_gain > 0 and control_gain about 0. Writes bench/results/gains.json, merges
``mixture_gain``, ``control_gain`` and ``gains`` into bench/results/science.json when that file was
measured with the same configuration, draws docs/gains.png, and prints the table.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.science import (  # noqa: E402
    CHANCE,
    CONFIGS,
    PRETRAIN_MIX,
    TASKS,
    BenchConfig,
    bench_parser,
    build_corpus,
    finetune,
    held_out_sessions,
    pretrain,
    save_figure,
)
from trainer.tune.report import mean_sem  # noqa: E402  (the sweeps' mean +- SEM over seeds, NaN-free)

CONTROL_CODE_SEED = 1_000_003  # the control corpus's EPhys code: any seed other than the corpus seed
ARM_MIX = {"ophys_only": "ophys=1", "mixture": PRETRAIN_MIX, "control": PRETRAIN_MIX}  # pretraining --mix
ARMS = tuple(ARM_MIX)


def run_seed(work: Path, stores: dict[str, Path], held: list[str], cfg: BenchConfig, seed: int) -> dict[str, dict]:
    """The three arms' OPhys test headline ({arm: {task: acc}}) for one training seed."""
    run = work / f"seed{seed}"  # bench/science.py's folder: its pretrain/ and pretrained/ are the mixture arm
    control = work / "control" / f"seed{seed}"
    arms = {
        "mixture": finetune(run, "pretrained", pretrain(run, "pretrain", stores["benchmark"], held, cfg, seed),
                            stores["benchmark"], held, cfg, seed),
        "ophys_only": finetune(run, "ophys_only", pretrain(run, "pretrain_ophys", stores["benchmark"], held, cfg,
                                                           seed, mix=ARM_MIX["ophys_only"]),
                               stores["benchmark"], held, cfg, seed),
        "control": finetune(control, "pretrained", pretrain(control, "pretrain", stores["control"], held, cfg, seed),
                            stores["control"], held, cfg, seed),
    }
    return {arm: arms[arm].get("ophys", {}) for arm in ARMS}


def gain(per_seed: dict, arm: str, seeds: list[int]) -> dict[str, tuple[float, float]]:
    """{task: (mean, SEM)} over seeds of arm - ophys_only (paired by seed)."""
    return {t: mean_sem([per_seed[s][arm].get(t, math.nan) - per_seed[s]["ophys_only"].get(t, math.nan)
                         for s in seeds]) for t in TASKS}


def plot(path: Path, table: dict[str, dict[str, tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    x = np.arange(len(TASKS))
    for i, arm in enumerate(ARMS):
        ax.bar(x + (i - 1) * 0.26, [table[arm][t][0] for t in TASKS], 0.26, yerr=[table[arm][t][1] for t in TASKS],
               capsize=2, label=arm.replace("_", "-"))
    ax.scatter(x, [CHANCE[t] for t in TASKS], marker="_", s=500, color="k", label="chance", zorder=3)
    ax.set_xticks(x, [t.replace("_", " ") for t in TASKS])
    ax.set_ylabel("OPhys test accuracy (held-out)")
    ax.set_title("pretraining mixture: OPhys only, + EPhys, + EPhys with an unrelated code")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    from shards.atomic import write_atomic

    p = bench_parser(__doc__, "gains", "bench/science.py's --work (its corpus and mixture runs are reused)")
    p.add_argument("--science", default=str(REPO / "bench" / "results" / "science.json"),
                   help="bench/science.py's result, which gains the keys when its configuration is this one")
    a = p.parse_args()
    cfg = CONFIGS[a.config]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    t0 = time.time()
    work = Path(a.work) / a.config
    stores = {"benchmark": build_corpus(work, cfg)[1],
              "control": build_corpus(work / "control", cfg, ("--ephys-code-seed", str(CONTROL_CODE_SEED)))[1]}
    held = held_out_sessions(stores["benchmark"], cfg.held_out, cfg.corpus_seed)
    if held != held_out_sessions(stores["control"], cfg.held_out, cfg.corpus_seed):
        raise SystemExit(f"error: {stores['control']}: the control corpus holds out other sessions than "
                         f"{stores['benchmark']}")
    held_all = [s for mod in ("ephys", "ophys") for s in held[mod]]
    per_seed = {s: run_seed(work, stores, held_all, cfg, s) for s in seeds}
    table = {arm: {t: mean_sem([per_seed[s][arm].get(t, math.nan) for s in seeds]) for t in TASKS} for arm in ARMS}
    gains = {arm: gain(per_seed, arm, seeds) for arm in ("mixture", "control")}
    config = {"name": a.config, **asdict(cfg)}
    result = {
        "mixture_gain": {t: v[0] for t, v in gains["mixture"].items()},
        "control_gain": {t: v[0] for t, v in gains["control"].items()},
        "mixture_gain_sem": {t: v[1] for t, v in gains["mixture"].items()},
        "control_gain_sem": {t: v[1] for t, v in gains["control"].items()},
        "ophys_accuracy": {arm: {t: v[0] for t, v in ts.items()} for arm, ts in table.items()},
        "ophys_sem": {arm: {t: v[1] for t, v in ts.items()} for arm, ts in table.items()},
        "chance": CHANCE, "held_out": held, "control_ephys_code_seed": CONTROL_CODE_SEED,
        "mixtures": ARM_MIX,
        "seeds": seeds, "config": config, "per_seed": per_seed, "wall_s": round(time.time() - t0, 1),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(a.out, json.dumps(result, indent=1))
    science = Path(a.science)
    merged = False
    if science.exists():
        doc = json.loads(science.read_text())
        if doc.get("config") == config:
            doc.update(mixture_gain=result["mixture_gain"], control_gain=result["control_gain"],
                       gains={k: v for k, v in result.items() if k not in ("mixture_gain", "control_gain", "config")})
            write_atomic(science, json.dumps(doc, indent=1))
            merged = True
    plot(Path(a.plot), table)
    print(f"{'task':18} {'chance':>7} " + " ".join(f"{arm:>13}" for arm in ARMS) + f" {'mixture gain':>14} "
          f"{'control gain':>14}")
    for t in TASKS:
        cell = lambda m, s: f"{m:.3f}±{s:.3f}"  # noqa: E731
        print(f"{t:18} {CHANCE[t]:7.3f} " + " ".join(f"{cell(*table[arm][t]):>13}" for arm in ARMS)
              + f" {cell(*gains['mixture'][t]):>14} {cell(*gains['control'][t]):>14}")
    print(f"wall {result['wall_s']:.0f} s -> {a.out}" + (f", {science}" if merged else
                                                          f" ({science} not updated: another configuration)")
          + f", {a.plot}")


if __name__ == "__main__":
    main()
