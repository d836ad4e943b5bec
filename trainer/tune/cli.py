"""``python -m trainer.tune``: the papers' experiments as Ray Tune sweeps, and ``report`` to rebuild
their tables and plots.

    python -m trainer.tune --ratios 0,0.5,1 --seeds 0,1 --shards STORE --out SWEEP
    python -m trainer.tune --experiment fig2 --shards STORE --out SWEEP --seeds 0   # a named spec, flags on top
    python -m trainer.tune --experiment my.yaml --shards s3://b/store --out s3://b/sweeps/mine --workers 8 \\
        --gpus-per-worker 1 --concurrent 4
    python -m trainer.tune report SWEEP              # results.md and the PNGs from results.parquet alone

Rerunning the same command on the same --out restores the sweep (Tuner.restore): finished trials are
kept, the missing or failed ones run. Bad input (a ratio outside [0, 1], an empty seed list, an unknown
experiment, variant or region, too few sessions to hold out, a spec with unknown keys) is one line on
stderr before any trial starts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from shards.store import Store, is_remote
from trainer.tune import report
from trainer.tune.hparams import write_hparams
from trainer.tune.results import read
from trainer.tune.spec import SEARCHES, load_spec
from trainer.tune.sweep import Plan, Resources, prepare, run_sweep
from trainer.typecheck import ConfigError

# flag -> spec field, how the text becomes its value
LISTS = {"ratios": float, "seeds": int, "set_sizes": "size", "variants": str, "ophys_regions": str,
         "ephys_regions": str, "evaluate": str}
SCALARS = {"held_out": int, "heldout_seed": int, "pretrain_steps": int, "finetune_epochs": int,
           "unfreeze_epoch": int, "preset": str, "search": str, "samples": int,
           "bayes_startup": int, "name": str}


def _items(flag: str, text: str, kind) -> list:
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    out = []
    for p in parts:
        try:
            out.append(None if kind == "size" and p in ("all", "null") else (int(p) if kind == "size" else kind(p)))
        except ValueError:
            raise ConfigError(f"command line (--{flag}): {p!r} is not a{'n integer' if kind in (int, 'size') else ' number'}"
                              ) from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.tune", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--experiment", help="a named spec (trainer/experiments/NAME.yaml) or a spec file")
    p.add_argument("--shards", help="the shard store (folder or s3://bucket/prefix)")
    p.add_argument("--out", help="the sweep folder (or s3://bucket/prefix: Ray's storage_path)")
    p.add_argument("--work", help="local folder for the trials' runs when --out is on S3 "
                                  "(default: ~/.cache/neuromix/sweeps/NAME); SWEEP itself otherwise")
    for name in LISTS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, metavar="A,B,...",
                       help=f"comma separated; overrides the spec's {name}" + (" (all = every session)"
                                                                              if name == "set_sizes" else ""))
    for name in SCALARS:
        p.add_argument("--" + name.replace("_", "-"), dest=name, choices=SEARCHES if name == "search" else None,
                       help=f"overrides the spec's {name}")
    p.add_argument("--workers", type=int, default=0, help="Ray Train workers per trial (0: in the trial's process)")
    p.add_argument("--cpus-per-worker", type=float, default=None, help="CPUs per worker (default: 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (default: 0)")
    p.add_argument("--concurrent", type=int, default=0, help="trials at once (default: as resources allow)")
    p.add_argument("--max-failures", type=int, default=1, help="retries of a failed trial, each from its last "
                                                               "stage (default: 1)")
    return p


def overrides(args: argparse.Namespace) -> dict:
    out = {}
    for name, kind in LISTS.items():
        text = getattr(args, name)
        if text is not None:
            out[name] = _items(name.replace("_", "-"), text, kind)
    for name, kind in SCALARS.items():
        text = getattr(args, name)
        if text is not None:
            try:
                out[name] = kind(text)
            except ValueError:
                raise ConfigError(f"command line (--{name.replace('_', '-')}): {text!r} is not an integer") from None
    return out


def sweep_main(argv: list[str]) -> dict:
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        spec = load_spec(args.experiment, overrides(args), lambda n: f"command line (--{n.replace('_', '-')})")
        res = Resources(workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                        gpus_per_worker=args.gpus_per_worker, concurrent=args.concurrent,
                        max_failures=args.max_failures)
        if min(res.workers, res.concurrent, res.max_failures) < 0:
            raise ValueError("--workers, --concurrent and --max-failures are >= 0")
        plan = prepare(spec, args.shards, args.out, res, work=args.work)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    n = f"{len(plan.points)} trial(s)" if plan.points else f"{spec.samples} trial(s) proposed by {spec.search}"
    print(f"sweep {spec.name} v{spec.version}: {n}, search {spec.search}; held-out sessions in "
          f"{plan.sweep.url('heldout.json')}", flush=True)
    summary = run_sweep(plan, res)
    written = []
    if summary["rows"]:
        written = report.build(plan.sweep)
        summary["hparams"] = hparams_to(plan, is_remote(args.out))
    summary["wall_s"] = round(time.time() - t0, 1)
    print_summary(plan.sweep, summary, written)
    if summary["errors"]:
        raise SystemExit(f"error: {len(summary['errors'])} trial(s) failed; rerun the same command to retry them")
    return summary


def hparams_to(plan: Plan, remote: bool) -> int:
    """SWEEP/tb: written in place for a local sweep; for one on object storage, written under the work
    folder and uploaded (TensorBoard's writer only writes local files), replacing the runs there."""
    if not remote:
        return write_hparams(read(plan.sweep), os.path.join(plan.storage_path, "tb"))
    local = os.path.join(plan.context["work"], "tb")
    n = write_hparams(read(plan.sweep), local)
    for rel in plan.sweep.list("tb"):
        plan.sweep.remove(rel)
    for root, _, files in os.walk(local):
        for name in files:
            path = os.path.join(root, name)
            plan.sweep.put_file(path, "tb/" + os.path.relpath(path, local).replace(os.sep, "/"))
    return n


def print_summary(sweep: Store, summary: dict, written: list[str]) -> None:
    print(f"\n{summary['finished']}/{summary['trials']} trial(s) finished"
          + (" (restored sweep)" if summary["restored"] else "")
          + (f", {len(summary['stopped'])} stopped early by the scheduler" if summary["stopped"] else "")
          + f", {summary['rows']} result rows, {summary['wall_s']:.0f} s")
    for e in summary["errors"]:
        print(f"  failed: {e}")
    if summary["rows"]:
        print(f"results: {sweep.url('results.parquet')}")
        for name in written:
            print(f"  {sweep.url(name)}")
        if summary.get("hparams"):
            print(f"watch them side by side: tensorboard --logdir {sweep.url('tb')} (HPARAMS)")
        md = sweep.read_bytes("results.md").decode()
        print("\n" + "###" + md.split("###", 1)[-1].split("## Plots", 1)[0].strip())


def report_main(argv: list[str]) -> list[str]:
    p = argparse.ArgumentParser(prog="python -m trainer.tune report",
                                description="Rebuild SWEEP/results.md and the PNGs from SWEEP/results.parquet alone.")
    p.add_argument("sweep", help="the sweep folder (or s3://...)")
    a = p.parse_args(argv)
    try:
        written = report.build(Store(a.sweep))
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    for name in written:
        print(Store(a.sweep).url(name))
    return written


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    return sweep_main(argv)
