"""The papers' mixture effect on the benchmark corpus, and its control: does EPhys in the pretraining
mixture help held-out OPhys sessions, and only when both modalities share what a stimulus means?

    python bench/gains.py                        # CPU configuration of bench/science.py, seeds 0,1,2
    python bench/gains.py --ratios 0.5           # one mixture only (bench/science.py's; a third of the time)
    python bench/gains.py --config smoke --seeds 0 --work /tmp/g   # minutes: checks the pipeline

Arms, each pretrained for the same number of steps of the same batch size (the same number of windows, the
papers' "same data budget"), then finetuned with bench/science.py's protocol on the same held-out sessions
(gradual unfreezing), scored on their test split per record:

- ``ophys_only``  every window OPhys (``--mix ophys=1``);
- ``mixture@R``   EPhys a share R of the windows (``--ratios``; R = 0.5 is bench/science.py's pretraining, whose
                  runs are reused from the same ``--work``);
- ``ophys_only/G`` and ``mixture@0.5/G`` (``--single-regions G``, the papers' Observation 3): OPhys of region G
                  only, alone and with every region's EPhys as half the windows;
- ``control@R``   the same mixtures on the control corpus (``ingest synth --ephys-code-seed``): its OPhys sessions
                  are byte for byte the benchmark's, its EPhys sessions have the same units and schedules but an
                  unrelated stimulus code, so EPhys can teach the trunk nothing about OPhys's classes.

The best mixture of each corpus is the ratio whose finetuned model scores best on the held-out OPhys session's
*valid* split (mean over seeds), so the test split picks nothing. ``mixture_gain[task]`` is its OPhys test
accuracy minus OPhys-only (paired by seed, mean over seeds; SEM beside it), ``control_gain`` the same for the
control corpus's best mixture: the papers' Observation 2 predicts mixture_gain > 0 and control_gain about 0.
``single_region_gain[G][task]`` is ``mixture@0.5/G`` minus ``ophys_only/G`` (paired by seed): Observation 3 predicts > 0.
Writes bench/results/gains.json, merges ``mixture_gain``, ``control_gain`` and ``gains`` into
bench/results/science.json when that file was measured with the same configuration, draws docs/gains.png, and
prints the table. Arms the previous bench/results/gains.json of the same configuration recorded are taken from it
(each seed's arm is deterministic), so a run adds arms without retraining the others; ``--rerun`` trains them all.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.science import (  # noqa: E402
    CHANCE,
    PRETRAIN_MIX,
    TASKS,
    BenchConfig,
    bench_parser,
    build_corpus,
    concurrently,
    config_of,
    finetune,
    held_out_sessions,
    pretrain,
    save_figure,
    set_jobs,
)
from trainer.tune.report import mean_sem  # noqa: E402  (the sweeps' mean +- SEM over seeds, NaN-free)

CONTROL_CODE_SEED = 1_000_003  # the control corpus's EPhys code: any seed other than the corpus seed
FAMILIES = ("mixture", "control")
# one plane's train split is a 21-step epoch, so a single-region pretraining would validate ~240 times in 5,000
# steps; this epoch validates it about as often as the mixture's own (262 steps of 32)
SINGLE_REGION_EPOCH = ("--epoch-windows", "8192")


def mix_of(ratio: float) -> str:
    """Pretraining ``--mix`` with EPhys a share ``ratio`` of the windows (0.5: bench/science.py's own)."""
    return PRETRAIN_MIX if ratio == 0.5 else f"ephys={ratio:g},ophys={1 - ratio:g}"


def suffix(ratio: float) -> str:
    """Run-folder suffix of a ratio; none at 0.5, so bench/science.py's pretrain/ and pretrained/ are reused."""
    return "" if ratio == 0.5 else f"_e{ratio:g}"


def valid_score(run: Path) -> float:
    """The finetuned model's OPhys score on the held-out session's valid split (what picks the best ratio)."""
    best = json.loads((run / "metrics.json").read_text())["best"]
    return float(best["modality"].get("ophys", {}).get("score", math.nan))


def run_seed(work: Path, stores: dict[str, Path], held: list[str], cfg: BenchConfig, seed: int,
             ratios: dict[str, list[float]], regions: tuple[str, ...] = (),
             recorded: dict[str, dict] | None = None) -> dict[str, dict]:
    """{arm: {"test": {task: OPhys test acc}, "valid": OPhys valid score}} of every arm for one training seed; an arm
    in ``recorded`` (the previous result of the same configuration, ``recorded_arms``) is taken from it, not rerun."""
    run = work / f"seed{seed}"  # bench/science.py's folder: its pretrain/ and pretrained/ are mixture@0.5
    control = work / "control" / f"seed{seed}"

    def arm(folder: Path, store: Path, mix: str, pre_name: str, ft_name: str, extra: tuple[str, ...] = ()) -> dict:
        pre = pretrain(folder, pre_name, store, held, cfg, seed, mix=mix, extra=extra)
        test = finetune(folder, ft_name, pre, store, held, cfg, seed)
        return {"test": test.get("ophys", {}), "valid": valid_score(folder / ft_name)}

    arms = {"ophys_only": partial(arm, run, stores["benchmark"], "ophys=1", "pretrain_ophys", "ophys_only")}
    for family, folder, store in (("mixture", run, stores["benchmark"]), ("control", control, stores["control"])):
        for r in ratios[family]:
            arms[f"{family}@{r:g}"] = partial(arm, folder, store, mix_of(r), f"pretrain{suffix(r)}",
                                              f"pretrained{suffix(r)}")
    for region in regions:  # Observation 3: one region's OPhys, alone and with every region's EPhys
        for name, mix in single_region_mixes(region).items():
            arms[name] = partial(arm, run, stores["benchmark"], mix, f"pretrain_{name.replace('/', '_')}",
                                 f"finetuned_{name.replace('/', '_')}", SINGLE_REGION_EPOCH)
    recorded = recorded or {}
    kept = {name: recorded[name] for name in arms if name in recorded}
    # each arm's runs in order, the arms side by side (--jobs at once)
    return {**kept, **concurrently({name: fn for name, fn in arms.items() if name not in kept})}


def recorded_arms(path: Path, config: dict) -> dict[int, dict[str, dict]]:
    """{seed: {arm: result}} of a previous result file measured with the same configuration (else nothing).

    Why: an arm is two training runs (~7 min on 2 cores) whose result is deterministic for its seed, and the arms'
    run folders live in a --work that does not outlive a machine. Taking the recorded arms lets a later run add
    arms (another --single-regions, another ratio) without retraining the ones it already has."""
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    if doc.get("config") != config:
        return {}
    return {int(seed): arms for seed, arms in doc.get("per_seed", {}).items()}


def single_region_mixes(region: str) -> dict[str, str]:
    """{arm: pretraining --mix} of Observation 3 for one OPhys region: its OPhys alone, and with every region's EPhys
    at half the windows (bench/science.py's share)."""
    return {f"ophys_only/{region}": f"ophys/{region}=1", f"mixture@0.5/{region}": f"ephys=1,ophys/{region}=1"}


def best_ratio(per_seed: dict, family: str, ratios: list[float], seeds: list[int]) -> float:
    """The ratio of ``family`` whose mean valid score over seeds is highest."""
    return max(ratios, key=lambda r: float(np.nanmean([per_seed[s][f"{family}@{r:g}"]["valid"] for s in seeds])))


def gain(per_seed: dict, arm: str, seeds: list[int], base: str = "ophys_only") -> dict[str, tuple[float, float]]:
    """{task: (mean, SEM)} over seeds of arm - base (paired by seed)."""
    return {t: mean_sem([per_seed[s][arm]["test"].get(t, math.nan) - per_seed[s][base]["test"].get(t, math.nan)
                         for s in seeds]) for t in TASKS}


def plot(path: Path, table: dict[str, dict[str, tuple[float, float]]], best: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(table)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(arms), 3.8))
    x = np.arange(len(TASKS))
    width = 0.84 / len(arms)
    oranges, greens = plt.cm.Oranges, plt.cm.Greens
    n = {f: sum(a.startswith(f) and "/" not in a for a in arms) for f in FAMILIES}
    regions = list(dict.fromkeys(a.split("/", 1)[1] for a in arms if "/" in a))  # one hatch per region
    for i, arm in enumerate(arms):
        fam, _, r = arm.partition("@")
        k = sum(a.startswith(fam) for a in arms[:i])
        if "/" in arm:  # Observation 3's single-region arms
            color = "tab:cyan" if fam.startswith("ophys_only") else "tab:purple"
        else:
            color = "tab:blue" if fam == "ophys_only" else (oranges if fam == "mixture" else greens)(0.4 + 0.5 * k / max(n[fam], 1))
        label = arm.replace("_", "-") + (" (best)" if r and "/" not in r and float(r) == best.get(fam) else "")
        hatch = ("//" if label.endswith("(best)") else
                 ("..", "xx", "\\\\", "++", "oo")[regions.index(arm.split("/", 1)[1]) % 5] if "/" in arm else None)
        ax.bar(x + (i - (len(arms) - 1) / 2) * width, [table[arm][t][0] for t in TASKS], width,
               yerr=[table[arm][t][1] for t in TASKS], capsize=2, label=label, color=color, hatch=hatch)
    ax.scatter(x, [CHANCE[t] for t in TASKS], marker="_", s=500, color="k", label="chance", zorder=3)
    ax.set_xticks(x, [t.replace("_", " ") for t in TASKS])
    ax.set_ylabel("OPhys test accuracy (held-out)")
    ax.set_title("pretraining: OPhys only, + EPhys (mixture@EPhys share), + EPhys with an unrelated code (control)",
                 fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def parse_ratios(flag: str, text: str) -> list[float]:
    """EPhys shares in (0, 1) from ``0.25,0.5``; a one-line error otherwise."""
    try:
        ratios = [float(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise SystemExit(f"error: {flag} {text!r}: give numbers like 0.25,0.5,0.75") from None
    if not ratios or any(not 0 < r < 1 for r in ratios):
        raise SystemExit(f"error: {flag} {text!r}: each EPhys share must be in (0, 1) (0 is ophys_only)")
    return ratios


def main() -> None:
    from shards.atomic import write_atomic
    from trainer.tune.heldout import regions_of, session_table

    p = bench_parser(__doc__, "gains", "bench/science.py's --work (its corpus and mixture runs are reused)")
    p.add_argument("--science", default=str(REPO / "bench" / "results" / "science.json"),
                   help="bench/science.py's result, which gains the keys when its configuration is this one")
    p.add_argument("--ratios", default="0.25,0.5,0.75", help="EPhys shares of the mixture pretraining")
    p.add_argument("--control-ratios", default=None, help="EPhys shares of the control pretraining (default: --ratios)")
    p.add_argument("--rerun", action="store_true", help="train every arm, also those the previous --out file of "
                   "this configuration recorded (by default they are taken from it)")
    p.add_argument("--single-regions", default="", help="Observation 3: OPhys regions (comma separated) each pretrained "
                   "alone and with every region's EPhys, e.g. VISp")
    a = p.parse_args()
    cfg = config_of(a)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    ratios = {"mixture": parse_ratios("--ratios", a.ratios),
              "control": parse_ratios("--control-ratios", a.control_ratios or a.ratios)}
    t0 = time.time()
    work = Path(a.work) / a.config
    stores = {"benchmark": build_corpus(work, cfg)[1],
              "control": build_corpus(work / "control", cfg, ("--ephys-code-seed", str(CONTROL_CODE_SEED)))[1]}
    held = held_out_sessions(stores["benchmark"], cfg.held_out, cfg.corpus_seed)
    if held != held_out_sessions(stores["control"], cfg.held_out, cfg.corpus_seed):
        raise SystemExit(f"error: {stores['control']}: the control corpus holds out other sessions than "
                         f"{stores['benchmark']}")
    held_all = [s for mod in ("ephys", "ophys") for s in held[mod]]
    set_jobs(a.jobs)
    regions = tuple(r for r in a.single_regions.split(",") if r)
    known = regions_of(session_table(str(stores["benchmark"])), "ophys")
    if set(regions) - set(known):
        raise SystemExit(f"error: --single-regions {a.single_regions!r}: {stores['benchmark']} has OPhys in "
                         f"{', '.join(known)} only")
    config = {"name": a.config, **asdict(cfg)}
    recorded = {} if a.rerun else recorded_arms(Path(a.out), config)
    per_seed = concurrently({s: partial(run_seed, work, stores, held_all, cfg, s, ratios, regions, recorded.get(s))
                             for s in seeds})
    arms = list(per_seed[seeds[0]])
    taken = {s: sorted(set(per_seed[s]) & set(recorded.get(s, {}))) for s in seeds}
    table = {arm: {t: mean_sem([per_seed[s][arm]["test"].get(t, math.nan) for s in seeds]) for t in TASKS}
             for arm in arms}
    best = {f: best_ratio(per_seed, f, ratios[f], seeds) for f in FAMILIES}
    gains = {f: gain(per_seed, f"{f}@{best[f]:g}", seeds) for f in FAMILIES}
    result = {
        "mixture_gain": {t: v[0] for t, v in gains["mixture"].items()},
        "control_gain": {t: v[0] for t, v in gains["control"].items()},
        "mixture_gain_sem": {t: v[1] for t, v in gains["mixture"].items()},
        "control_gain_sem": {t: v[1] for t, v in gains["control"].items()},
        "best_ratio": best, "ratios": ratios,
        # the same mixture on both corpora: what a shared stimulus code is worth at each ratio both ran
        "mixture_minus_control": {f"{r:g}": {t: mean_sem([per_seed[s][f"mixture@{r:g}"]["test"].get(t, math.nan)
                                                          - per_seed[s][f"control@{r:g}"]["test"].get(t, math.nan)
                                                          for s in seeds]) for t in TASKS}
                                  for r in ratios["mixture"] if r in ratios["control"]},
        "ophys_accuracy": {arm: {t: v[0] for t, v in ts.items()} for arm, ts in table.items()},
        "ophys_sem": {arm: {t: v[1] for t, v in ts.items()} for arm, ts in table.items()},
        "ophys_valid_score": {arm: float(np.nanmean([per_seed[s][arm]["valid"] for s in seeds])) for arm in arms},
        "chance": CHANCE, "held_out": held, "control_ephys_code_seed": CONTROL_CODE_SEED,
        "mixtures": {"ophys_only": "ophys=1", **{f"{f}@{r:g}": mix_of(r) for f in FAMILIES for r in ratios[f]}},
        "seeds": seeds, "config": config, "per_seed": per_seed, "wall_s": round(time.time() - t0, 1),
        "recorded_arms": taken,  # taken from the previous file of this configuration: wall_s leaves them out
    }
    if regions:  # Observation 3: each region's OPhys with all-region EPhys minus that OPhys alone, paired by seed
        single = {r: gain(per_seed, f"mixture@0.5/{r}", seeds, f"ophys_only/{r}") for r in regions}
        result["single_region_gain"] = {r: {t: v[0] for t, v in g.items()} for r, g in single.items()}
        result["single_region_gain_sem"] = {r: {t: v[1] for t, v in g.items()} for r, g in single.items()}
        result["mixtures"].update({k: v for r in regions for k, v in single_region_mixes(r).items()})
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
    plot(Path(a.plot), table, best)
    print(f"{'task':18} {'chance':>7} " + " ".join(f"{arm:>13}" for arm in arms) + f" {'mixture gain':>14} "
          f"{'control gain':>14}")
    for t in TASKS:
        cell = lambda m, s: f"{m:.3f}±{s:.3f}"  # noqa: E731
        print(f"{t:18} {CHANCE[t]:7.3f} " + " ".join(f"{cell(*table[arm][t]):>13}" for arm in arms)
              + f" {cell(*gains['mixture'][t]):>14} {cell(*gains['control'][t]):>14}")
    print(f"{'valid score':18} {'':7} " + " ".join(f"{result['ophys_valid_score'][arm]:13.3f}" for arm in arms)
          + f"   best: mixture@{best['mixture']:g}, control@{best['control']:g}")
    for r in regions:
        print(f"single-region OPhys {r}: + all-region EPhys minus {r} alone: "
              + ", ".join(f"{t} {result['single_region_gain'][r][t]:+.3f}±{result['single_region_gain_sem'][r][t]:.3f}"
                          for t in TASKS))
    print(f"wall {result['wall_s']:.0f} s -> {a.out}" + (f", {science}" if merged else
                                                          f" ({science} not updated: another configuration)")
          + f", {a.plot}")


if __name__ == "__main__":
    main()
