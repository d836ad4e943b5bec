"""Training throughput and data-wait fraction: Ray Train workers streaming a synthetic store.

    python bench/train.py [--sessions 4] [--duration 600] [--steps 60]

Rows (each a real ``trainer.train.run`` on a local Ray cluster; figures are the means of the
TensorBoard ``perf/*`` scalars after the first log interval, i.e. after warm-up):
1. 2 CPU workers, small model (the demo's), 2 DataLoader processes per worker;
2. the same with the loader in the training process (``loader_workers=0``): what the
   background loader buys;
3. 2 CPU workers, the papers' model size (dim 128, 6 layers), 2 DataLoader processes;
4. one GPU (bf16, papers' model, 4 DataLoader processes) when this machine has one; otherwise the row
   says so. The goal (issue): data wait < 5% of step time at full GPU rate.
Also the input pipeline alone (StreamLoader, 2 and 4 processes, no model): the step rate it can feed.
data-wait fraction = time blocked on the loader / wall time of the steps (reports/validation excluded).
Results: bench/results/train.json (``data_wait_fraction``: row 4 when a GPU ran, else row 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench.common import build_store  # noqa: E402


def perf(run_dir: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in ("perf/steps_per_s", "perf/data_wait_fraction", "perf/samples_per_s", "perf/tokens_per_s",
                "perf/gpu_mem_gb"):
        if tag in acc.Tags()["scalars"]:
            vals = [e.value for e in acc.Scalars(tag) if e.step > 1][1:]  # drop step 1 and the first interval
            out[tag.split("/")[1]] = round(sum(vals) / len(vals), 4) if vals else None
    return out


def train_row(store: str, work: Path, name: str, steps: int, **kw) -> dict:
    from trainer.config import TrainConfig
    from trainer.train import run

    cfg = TrainConfig(shards=store, out=str(work / name), mix="ephys=1,ophys=1", max_steps=steps, log_every=5,
                      report_every=10_000, early_stop_patience=0, val_batches=1, **kw)
    t = time.time()
    run(cfg)
    row = {"config": {k: kw[k] for k in sorted(kw)}, "steps": steps, "wall_s": round(time.time() - t, 1),
           **perf(cfg.out)}
    print(f"{name}: {row}", flush=True)
    return row


def loader_only(store: str, workers: int, batches: int = 60) -> dict:
    """Batches/s of one rank's StreamLoader with no model: the step rate the input pipeline sustains."""
    from shards.stream.dataset import MixtureStream, StreamConfig
    from shards.stream.loader import StreamLoader

    loader = StreamLoader(MixtureStream(StreamConfig(store=store, mix="ephys=1,ophys=1", batch_size=32)),
                          num_workers=workers)
    it = iter(loader)
    next(it)  # workers started
    t, n, tokens = time.perf_counter(), 0, 0
    for b in it:
        n += 1
        tokens += int(b["input_cu_seqlens"][-1])
        if n == batches:
            break
    dt = time.perf_counter() - t
    return {"loader_workers": workers, "batches_per_s": round(n / dt, 2), "tokens_per_batch": round(tokens / n)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sessions", type=int, default=4, help="synthetic sessions (default: 4)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds per session (default: 600)")
    p.add_argument("--steps", type=int, default=60, help="steps per CPU row, small model (default: 60)")
    p.add_argument("--paper-steps", type=int, default=15, help="steps of the papers'-size CPU row (default: 15)")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    a = p.parse_args()

    import ray
    import torch

    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="bench-train-"))
    gpus = torch.cuda.device_count()
    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus, object_store_memory=256 << 20,
             include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        store = build_store(work, a.sessions, a.duration, units_per_region=60)
        rows = {
            "cpu_2workers_small_loader2": train_row(store, work, "small-l2", a.steps, workers=2, preset="small",
                                                    loader_workers=2, use_gpu=False),
            "cpu_2workers_small_loader0": train_row(store, work, "small-l0", a.steps, workers=2, preset="small",
                                                    loader_workers=0, use_gpu=False),
            "cpu_2workers_paper_loader2": train_row(store, work, "paper-l2", a.paper_steps, workers=2,
                                                    preset="paper", loader_workers=2, use_gpu=False),
        }
        if gpus:
            rows["gpu_1worker_paper_bf16_loader4"] = train_row(store, work, "gpu", 200, workers=1, preset="paper",
                                                               loader_workers=4, use_gpu=True, bf16=True)
        loaders = [loader_only(store, w) for w in (2, 4)]
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    head = rows.get("gpu_1worker_paper_bf16_loader4") or rows["cpu_2workers_small_loader2"]
    result = {
        "data_wait_fraction": head["data_wait_fraction"],
        "data_wait_fraction_from": "gpu_1worker_paper_bf16_loader4" if gpus else "cpu_2workers_small_loader2",
        "steps_per_s": head["steps_per_s"],
        "rows": rows,
        "loader_only": loaders,
        "gpu": torch.cuda.get_device_name(0) if gpus else "none on this machine: the GPU row did not run",
        "machine": f"{platform.machine()}  cores={os.cpu_count()}  torch {torch.__version__}  ray {ray.__version__}",
        "store": {"sessions": a.sessions, "duration_s": a.duration, "units_per_region": 60, "rois": 150},
        "goal": {"data_wait_fraction": "< 0.05 at full GPU rate"},
        "wall_s": round(time.time() - t0, 1),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
